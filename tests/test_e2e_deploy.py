"""scripts/deploy.sh end to end: savepid, shutdown, kill, and supervisord again.

The config has no ``nodaemon``, as on a server: the script's ``supervisord
-c FILE`` daemonizes, and the test finds the new supervisord through its
socket and shuts it down by PID. The first supervisord is started by the
harness as pytest's child (``supervisord -n``), so once it exits it is a
zombie until pytest collects it; the script must see that it has exited
(it used to poll with ``kill -0``, which a zombie passes).
"""

import os
import re
import socket
import subprocess

import pytest

from realprocs import wait_for, wait_gone
from realsupervisor import BIN, PROGRAM, REPO, copy_project
from taskfamily import ATTACHED, DETACHED, alive, start_families, worker_tree

DEPLOY = REPO / "scripts" / "deploy.sh"
NEW_WORKER_TIMEOUT = 45


def deploy(*args, cwd, env, timeout=120):
    return subprocess.run(
        ["bash", str(DEPLOY), *args],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def script_env(run=None):
    """The worker's environment, with this virtualenv's supervisorctl and supervisord first on PATH."""
    env = dict(run.env if run else os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


@pytest.mark.e2e
@pytest.mark.parametrize("tool", [("-A", "demo"), ("-m", "manage.py")], ids=["cli", "manage.py"])
def test_deploy_script_kills_attached_spares_detached_and_restarts(supervisor, real_procs, project, tool, tmp_path):
    run = supervisor(stopwaitsecs=2, project_dir=project, nodaemon=False)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=2)
    family_procs = [p for f in families for p in f.procs.values()]

    # -s: the stop cuts the tasks off, and the record of what to re-send is kept; here, not in /tmp.
    result = deploy("-c", str(run.conf_path), *tool, "-g", "5", "-s", str(tmp_path / "state.json"), cwd=project,
                    env=script_env(run))
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    for step in ("1/4 recording worker trees", f"2/4 supervisorctl shutdown (supervisord PID {run.pid})",
                 "3/4 killing what the workers left behind (grace 5s)", "4/4 starting supervisord"):
        assert f"deploy.sh: {step}" in result.stderr, output
    assert "killed 6, spared 6, already gone 3, refused 0, failed 0" in result.stdout, output

    assert run.proc.poll() == 0  # the old supervisord, collected only now
    assert wait_gone([tree.main, *tree.pools], timeout=5) == []
    assert {p.pid for p in family_procs if alive(p)} == {pid for f in families for pid in f.pids(*DETACHED)}
    assert not any(alive(p) for f in families for role, p in f.procs.items() if role in ATTACHED)

    # A new, daemonized supervisord runs a new worker.
    daemon = run.daemon()
    assert daemon is not None, output
    [new_pid] = re.findall(r"done: supervisord is running \(PID (\d+)\)", result.stderr)
    assert daemon.pid == int(new_pid) != run.pid
    assert os.getsid(daemon.pid) == daemon.pid  # it daemonized: a session of its own
    proxy = run.proxy()

    def new_worker():
        [info] = proxy.supervisor.getAllProcessInfo()
        assert info["statename"] in ("STARTING", "RUNNING"), info
        return info["statename"] == "RUNNING" and run.celery.ping() and info["pid"]

    worker_pid = wait_for(new_worker, NEW_WORKER_TIMEOUT, f"a new {PROGRAM} to answer a ping", interval=0.1)
    assert worker_pid != tree.main.pid
    new_tree = real_procs.track(worker_pid)[0]
    real_procs.track(*new_tree.children())

    # Clean up: the new supervisord by PID, then the spared survivors.
    result = run.ctl("shutdown")
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_gone([daemon], timeout=30) == []
    assert real_procs.reap() == []


@pytest.mark.e2e
def test_deploy_script_stops_nothing_when_savepid_fails(supervisor, project):
    run = supervisor(stopwaitsecs=2, project_dir=project, nodaemon=False)
    run.wait_ready()
    [worker_pid] = run.worker_pids()

    result = deploy("-c", str(run.conf_path), "-A", "nosuchapp", cwd=project, env=script_env(run))
    assert result.returncode == 1, result.stderr
    assert "cannot load Celery app 'nosuchapp'" in result.stderr
    assert result.stderr.rstrip().endswith("deploy.sh: error: savepid failed; nothing was stopped")
    assert run.proc.poll() is None
    assert run.worker_pids() == [worker_pid]
    # the worker has gone on working
    assert run.celery.ping() == [f"demo0@{socket.gethostname()}"]


@pytest.mark.parametrize("args, code, message", [
    ((), 1, "no supervisord configuration: pass -c FILE or set SUPERVISORD_CONF"),
    (("-c", "/nonexistent.conf", "-A", "demo"), 1, "cannot read supervisord configuration /nonexistent.conf"),
    (("-c", str(DEPLOY)), 1, "no Celery app: pass -A APP (or set CELERY_APP) or -m manage.py"),
    (("-c", str(DEPLOY), "-A", "demo", "-g", "soon"), 1, "-g: not a number of seconds: soon"),
    (("-c", str(DEPLOY), "-A", "demo", "extra"), 2, "usage: deploy.sh -c SUPERVISORD_CONF"),
    (("-x",), 2, "usage: deploy.sh -c SUPERVISORD_CONF"),
], ids=["no config", "unreadable config", "no app", "bad grace", "extra argument", "unknown option"])
def test_deploy_script_refuses_bad_arguments(tmp_path, args, code, message):
    env = {k: v for k, v in script_env().items() if k not in ("SUPERVISORD_CONF", "CELERY_APP")}
    result = deploy(*args, cwd=tmp_path, env=env, timeout=30)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "1/4" not in result.stderr  # refused before any step
