"""``print-config``'s snippet run by a real supervisord, included from a host config.

The host config has its own socket, log and pidfile and includes
``conf.d/*.conf``, where the snippet goes as printed by ``celery-supervise
-A demo print-config`` (its defaults: the ``celery`` of this virtualenv,
``-n demo-worker@%h``, the folder it ran in). supervisord must start the
worker, the listener must record it, and when the worker is stopped the
listener must kill the attached children its task left and spare the
nohup'd and setsid'd ones::

    demo-worker main            stopped by supervisord (TERM)
    └── pool                    exits with it
        ├── sleep, sh → sleep   killed by the listener   attached
        ├── nohup sleep         spared                    nohup
        └── sh (setsid) → sleep spared                    own session
"""

import json
import socket

import pytest

from realprocs import wait_for, wait_gone
from realsupervisor import copy_project, host_config
from taskfamily import ATTACHED, DETACHED, Family, alive, celery_supervise

pytestmark = pytest.mark.e2e

PROGRAM = "demo-worker"  # print-config's default for -A demo


def test_the_printed_snippet_runs_under_a_real_supervisord(supervisor, real_procs, tmp_path):
    project = copy_project(tmp_path / "project")
    conf_d, state = tmp_path / "conf.d", tmp_path / "state"
    conf_d.mkdir()
    printed = celery_supervise("-A", "demo", "print-config", "--state-dir", str(state), "--log-dir", str(tmp_path),
                               cwd=project, env=None)
    assert printed.returncode == 0 and printed.stderr == "", printed.stderr
    (conf_d / "demo.conf").write_text(printed.stdout)

    run = supervisor(project_dir=project, config=host_config(f"{conf_d}/*.conf"))
    run.extra_logs += [f"../{PROGRAM}.log", f"../{PROGRAM}-supervise.log"]
    run.wait_ready()
    running = {f"{PROGRAM}:{PROGRAM}": "RUNNING", f"{PROGRAM}-supervise:{PROGRAM}-supervise": "RUNNING"}
    wait_for(lambda: run.states() == running, 15, f"both programs RUNNING (startsecs), not {run.states()}")
    [main_pid] = run.group_pids(PROGRAM).values()
    [main] = real_procs.track(main_pid)
    real_procs.track(*main.children())
    assert run.celery.ping() == [f"{PROGRAM}@{socket.gethostname()}"]  # -n demo-worker@%h reached Celery
    record = state / f"{PROGRAM}@{main_pid}.json"
    wait_for(record.exists, 15, f"the listener's record {record}")

    marker = run.celery.wait_for_marker(run.celery.spawn_family(hold=0, lifetime=90))
    family = Family(marker, dict(zip(marker["children"], real_procs.track(*marker["children"].values()))))
    assert family.procs.keys() == marker["children"].keys()

    def recorded():  # the listener re-reads the tree every 2 s while idle
        doc = json.loads(record.read_text())
        return family.pids(*ATTACHED, *DETACHED) <= {p["pid"] for w in doc["workers"] for p in w["procs"]}

    wait_for(recorded, 15, "the listener to record the task's children")

    stopped = run.ctl("stop", PROGRAM)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    report = wait_for(lambda: next(state.glob(f"{PROGRAM}@{main_pid}.*.report.json"), None), 30,
                      "the listener's kill report")
    statuses = {p["pid"]: p["status"] for p in json.loads(report.read_text())["processes"]}
    assert wait_gone([family.procs[role] for role in ATTACHED], timeout=10) == []
    assert all(alive(family.procs[role]) for role in DETACHED)
    assert {statuses.get(pid) for pid in family.pids(*DETACHED)} == {"spared"}, statuses
    assert run.proc.poll() is None
    assert real_procs.reap() == []
