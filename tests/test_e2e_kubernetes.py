"""The Kubernetes example (``examples/kubernetes/``), without Kubernetes or Docker.

What the kubelet does to the Pod of ``pod.yaml``, done to the image's entry
point: ``entrypoint.sh`` runs in a PID namespace of its own (``unshare
--pid --fork --mount-proc``), so that supervisord is PID 1 with the
example's ``supervisord.conf``, and the environment the Dockerfile sets
points it at a private copy of the demo project. Then, as on a Pod's
deletion:

1. the preStop hook: the command ``pod.yaml`` names, run inside the
   namespace (``nsenter``), from the image's WORKDIR, waits for the running
   task to finish;
2. SIGTERM to PID 1: supervisord stops the worker, then the listener, which
   reaps what the worker left;
3. the namespace ends (PID 1 exits), well before
   ``terminationGracePeriodSeconds``, counted from the start of the hook,
   would have the kubelet SIGKILL it.

A ``spawn_family`` task has returned at once, leaving its children behind
(attached ones to kill, a nohup'd and a setsid'd one to spare), and a
``mark`` task is still running when the hook starts.
"""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from realcontainer import UNSHARE, Namespace
from realprocs import is_gone, wait_for
from realsupervisor import BIN, REPO, DemoClient, copy_project
from taskfamily import ATTACHED, DETACHED

pytestmark = pytest.mark.e2e

EXAMPLE = REPO / "examples" / "kubernetes"
MARK_HOLD = 3.0


def pod_spec():
    """``(preStop command, terminationGracePeriodSeconds)`` from ``pod.yaml``.

    The command is a YAML flow sequence of double-quoted strings, which is
    JSON too.
    """
    text = (EXAMPLE / "pod.yaml").read_text()
    [command] = re.findall(r"preStop:\s*\n\s*exec:\s*\n(?:\s*#.*\n)*\s*command:\s*(\[.*\])", text)
    [grace] = re.findall(r"terminationGracePeriodSeconds:\s*(\d+)", text)
    return json.loads(command), int(grace)


def dockerfile_env():
    """The ``ENV`` the Dockerfile sets, as a dict."""
    text = (EXAMPLE / "Dockerfile").read_text()
    [block] = re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M)
    return dict(pair.split("=", 1) for pair in block.replace("\\\n", " ").split())


def test_prestop_drain_then_sigterm_to_pid_1_ends_the_container_cleanly(real_procs, tmp_path):
    prestop, grace_period = pod_spec()
    assert prestop[:4] == ["celery-supervise", "-A", "demo", "drain"], prestop
    image_env = dockerfile_env()
    project = copy_project(tmp_path / "app")
    run_dir = tmp_path / "run"
    state_dir = run_dir / "celery-supervise"
    broker_dir, marker_dir = tmp_path / "broker", tmp_path / "markers"
    marker_dir.mkdir()
    # The image's environment, its paths moved to this test's folders.
    env = {**os.environ, **image_env, "APP_DIR": str(project), "RUN_DIR": str(run_dir),
           "SUPERVISORD_CONF": str(EXAMPLE / "supervisord.conf"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "CELERY_SUPERVISE_BROKER_DIR": str(broker_dir), "CELERY_SUPERVISE_JOURNAL_DIR": str(tmp_path / "journal"),
           "CELERY_SUPERVISE_LOCK": str(tmp_path / "reaper.lock")}
    assert env["CELERY_APP"] == "demo"
    output = tmp_path / "container.log"
    with open(output, "wb") as out:
        unshare = real_procs.spawn([*UNSHARE, "sh", str(EXAMPLE / "entrypoint.sh")], env=env, cwd=str(project),
                                   stdout=out, stderr=subprocess.STDOUT)
    box = Namespace.of(unshare, env)
    pid1 = real_procs.track(box.init)[0]
    client = DemoClient(broker_dir, marker_dir)

    def log():
        return output.read_text(errors="replace")

    def record():
        """The listener's record of the worker: its file name and the number of processes in it."""
        found = sorted(state_dir.glob("celery-worker@*.json")) if state_dir.exists() else []
        found = [p for p in found if not p.name.endswith(".report.json")]
        if not found:
            return None
        try:
            return found[0].name, len(json.loads(found[0].read_text())["workers"][0]["procs"])
        except (OSError, ValueError):
            return None  # being replaced (atomic rename): read it again

    try:
        wait_for(lambda: unshare.poll() is None and client.ping(), 60, "the worker to answer a ping")
        assert pid1.cmdline()[1].endswith("supervisord"), pid1.cmdline()
        family_task = client.spawn_family(hold=0, lifetime=90)
        family = client.wait_for_marker(family_task)
        children = {role: real_procs.track(box.host_pid(pid))[0] for role, pid in family["children"].items()}
        mark = client.mark(hold=MARK_HOLD)
        client.wait_for_mark(mark, "started")
        # main, two pool processes, the six children: on record before the stop
        wait_for(lambda: (record() or ("", 0))[1] >= 9, 20, "the listener to record the whole tree")

        hook_started = time.monotonic()
        hook = box.inside(prestop, cwd=project, timeout=grace_period)
        assert hook.returncode == 0, f"stdout:\n{hook.stdout}\nstderr:\n{hook.stderr}"
        assert client.mark_record(mark, "done") is not None, "the drain returned before the task finished"
        assert [role for role, p in children.items() if is_gone(p)] == []  # a drain kills nothing

        pid1.send_signal(signal.SIGTERM)
        code = unshare.wait(timeout=max(1.0, grace_period - (time.monotonic() - hook_started)))
        ended_after = time.monotonic() - hook_started
    except BaseException:
        print(log())
        raise
    finally:
        client.close()

    assert code == 0, log()
    assert "received SIGTERM indicating exit request" in log()
    assert ended_after < grace_period
    reports = [json.loads(p.read_text()) for p in state_dir.glob("*.report.json")]
    assert len(reports) == 1, log()
    [report] = reports
    outcome = {p["pid"]: (p["status"], p["reason"]) for p in report["processes"]}
    for role in ATTACHED:
        assert outcome[family["children"][role]][0] == "killed", report
    assert outcome[family["children"]["nohup"]] == ("spared", "nohup")
    assert outcome[family["children"]["setsid"]] == ("spared", "own session")
    assert {outcome[family["children"][role]][0] for role in DETACHED} == {"spared"}
    assert report["summary"]["failed"] == 0 and report["summary"]["refused"] == 0
    # The spared ones ended with their container, as everything in it does.
    assert is_gone(pid1) and all(is_gone(p) for p in children.values())
    print(f"kubernetes flow: the container ended {ended_after:.1f}s after the preStop hook started "
          f"(terminationGracePeriodSeconds {grace_period})")
    assert real_procs.reap() == []
