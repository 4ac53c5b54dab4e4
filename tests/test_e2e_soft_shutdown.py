"""Celery's soft shutdown (5.5+) under supervisord and the listener.

``stopsignal=QUIT`` asks for a cold shutdown; with ``worker_soft_shutdown_timeout``
set, Celery first gives the running tasks that long (a time-limited warm
shutdown), then cancels what still runs and exits by itself, before
``stopwaitsecs``. The worker (``-c 2``) runs two tasks when it is stopped::

    1000 celery worker (main)         exits by itself after the soft shutdown
    ├── 1001 pool: mark               finishes within the soft shutdown
    └── 1002 pool: spawn_family (60 s)  cancelled when it ends
        ├── sleep / sh → sleep        killed by the listener  attached
        ├── nohup sleep               spared                  nohup
        └── sh (setsid) → sleep       spared                  own session

and requeue, from a savepid taken before the stop, re-sends only the
cancelled task: the journal says the other one finished.
"""

import subprocess
import time

import celery
import pytest

from realprocs import wait_for
from realsupervisor import BIN, PROGRAM, copy_project, listener_section
from taskfamily import ATTACHED, DETACHED, alive, celery_supervise, json_output, start_families
from test_e2e_listener import Listening

pytestmark = [pytest.mark.e2e, pytest.mark.soft_shutdown]

SOFT_SHUTDOWN = 5.0  # worker_soft_shutdown_timeout
STOPWAITSECS = 25  # longer than the soft shutdown plus the cold shutdown that follows


def celery_version():
    return tuple(int(x) for x in celery.__version__.split(".")[:2])


def test_soft_shutdown_gives_running_tasks_their_time_then_the_listener_reaps(supervisor, real_procs, tmp_path):
    # Not a skip: a Celery without soft shutdown must not pass this test unnoticed.
    assert celery_version() >= (5, 5), (f"Celery {celery.__version__} has no soft shutdown (5.5+): deselect this "
                                        "test with -m 'not soft_shutdown' where the matrix installs an older one")
    project = copy_project(tmp_path / "project")
    (project / "demo" / "settings_soft.py").write_text(
        f"from .settings import *  # noqa: F401,F403\n\nCELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = {SOFT_SHUTDOWN}\n")
    extra = listener_section(BIN / "celery-supervise", 2, project, stdout_logfile="%(here)s/listener.stdout")
    run = supervisor(stopsignal="QUIT", stopwaitsecs=STOPWAITSECS, priority=200, extra=extra, project_dir=project,
                     env={"DJANGO_SETTINGS_MODULE": "demo.settings_soft",
                          "CELERY_SUPERVISE_LOCK": str(tmp_path / "reaper.lock")})
    run.extra_logs.append("listener.log")
    run.wait_ready()
    lst = Listening(run, real_procs)
    [main_pid] = run.group_pids(PROGRAM).values()
    [main] = real_procs.track(main_pid)
    real_procs.track(*main.children())
    [family] = start_families(run.celery, real_procs, count=1, hold=60)
    # The short task runs until the test removes its gate: once the soft shutdown has begun.
    gate = tmp_path / "gate"
    gate.write_text("")
    mark = run.celery.mark(hold=60, gate=gate)
    run.celery.wait_for_mark(mark, "started")
    lst.wait_entries("recorded", pid=main_pid, processes=lambda n: n >= 9)  # main, 2 pools, 6 children
    state = tmp_path / "state.json"
    saved = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=project, env=run.env))
    assert {t["id"] for w in saved["workers"] for t in w["tasks"]} == {family.task_id, mark}

    stopped_at = time.time()
    stop = subprocess.Popen([str(BIN / "supervisorctl"), "-c", str(run.conf_path), "stop", f"{PROGRAM}:*"],
                            env=run.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Initiating Soft Shutdown" in run.log(f"{PROGRAM}_0"), 20, "the soft shutdown to begin")
        gate.unlink()
        output, _ = stop.communicate(timeout=STOPWAITSECS + 20)
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    took = time.time() - stopped_at
    assert stop.returncode == 0, output

    # Celery waited out the soft shutdown, then exited by itself: no SIGKILL from supervisord.
    assert SOFT_SHUTDOWN <= took < STOPWAITSECS, took
    log = run.log()
    assert "with SIGKILL" not in log, log
    # The short task had its time and finished after the stop; the long one did not.
    done = run.celery.mark_record(mark, "done")
    assert done is not None and done["time"] > stopped_at
    assert not (run.marker_dir / f"{family.task_id}.done").exists()
    # The listener reaped what the cancelled task left, as after any stop.
    [entry] = lst.wait_entries("reaped")
    report = lst.reports()[entry["report"].rsplit("/", 1)[-1]]
    outcome = {p["pid"]: p["status"] for p in report["processes"]}
    assert {outcome[pid] for pid in family.pids(*ATTACHED)} == {"killed"}, report
    assert {outcome[pid] for pid in family.pids(*DETACHED)} == {"spared"}, report
    assert not any(alive(family.procs[r]) for r in ATTACHED)
    assert all(alive(family.procs[r]) for r in DETACHED)
    lst.check_log()

    # requeue: the finished task is not sent again, the cancelled one is.
    plan = json_output(celery_supervise("-A", "demo", "requeue", str(state), "--dry-run", "--json",
                                        cwd=project, env=run.env))
    decided = {t["id"]: (t["status"], t["reason"]) for t in plan["tasks"]}
    assert decided[mark] == ("skipped", "finished (journal: SUCCESS)"), decided
    assert decided[family.task_id][0] == "would re-send", decided
    print(f"soft shutdown {SOFT_SHUTDOWN}s: the stop took {took:.2f}s; the long task: {decided[family.task_id][1]}")
    assert real_procs.reap() == []
