"""status and savepid show the task children a worker has already orphaned.

A ``spawn_orphans`` task (``django_app/demo/tasks.py``) runs a shell that
starts three sleeps in the background and exits at once, while the task
itself goes on running::

    1000 celery worker (main)          kill    worker main process
    ├── 1001 pool                      kill    pool process       (runs the task)
    └── 1002 pool                      kill    pool process
    PID 1 (or the nearest subreaper)
    ├── 1010 sleep                     kill    attached orphan of the worker   pgid 1000
    ├── 1011 nohup sleep               spare   nohup                           pgid 1000
    └── 1012 setsid sleep              -       own session: not the worker's group, never seen

The first two are no longer below the worker but still in its process
group. ``kill`` always found them (its group scan); ``status`` and
``savepid`` now find them the same way, so the tree they show and record is
the one the kill acts on.
"""

import json

import pytest

from realprocs import wait_gone
from realsupervisor import copy_project
from taskfamily import alive, celery_supervise, json_output, outcomes, recorded_verdicts, shutdown, worker_tree

pytestmark = pytest.mark.e2e


def test_status_and_savepid_show_the_already_orphaned_and_kill_acts_on_them(supervisor, real_procs, tmp_path):
    project = copy_project(tmp_path / "project")
    run = supervisor(stopwaitsecs=2, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    marker = run.celery.wait_for_marker(
        run.celery.app.send_task("demo.tasks.spawn_orphans", kwargs={
            "marker_dir": str(run.marker_dir), "hold": 60, "lifetime": 90}).id)
    kids = dict(zip(marker["children"], real_procs.track(*marker["children"].values())))
    orphan, nohup_orphan, setsid_orphan = kids["orphan"], kids["nohup_orphan"], kids["setsid_orphan"]
    pool_pids = {p.pid for p in tree.pools}
    for proc in kids.values():  # re-parented already, while the task still runs
        assert proc.ppid() not in pool_pids | {tree.main.pid}, proc
    env, cwd = run.env, project

    status = json_output(celery_supervise("-A", "demo", "status", "--json", cwd=cwd, env=env))
    verdicts = recorded_verdicts(status)
    assert verdicts[orphan.pid] == ("kill", "attached orphan of the worker"), verdicts
    assert verdicts[nohup_orphan.pid] == ("spare", "nohup"), verdicts
    assert setsid_orphan.pid not in verdicts  # its own session and group: not the worker's

    text = celery_supervise("-A", "demo", "status", cwd=cwd, env=env)
    assert text.returncode == 0, text.stderr
    assert "2 process(es) already orphaned" in text.stdout, text.stdout
    assert f"{orphan.pid} task sleep 90  kill attached orphan of the worker (orphaned: parent now PID" \
        in text.stdout, text.stdout

    state = tmp_path / "state.json"
    saved = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=cwd, env=env))
    assert recorded_verdicts(saved) == verdicts
    record = json.loads(state.read_text())
    [worker] = record["workers"]
    recorded = {p["pid"]: p for p in worker["procs"]}
    assert {orphan.pid, nohup_orphan.pid} <= recorded.keys()
    assert recorded[orphan.pid]["pgid"] == tree.main.pid
    assert recorded_verdicts(record)[orphan.pid] == ("kill", "attached orphan of the worker")

    shutdown(run)  # SIGKILL after stopwaitsecs: the task is cut off, the orphans stay
    assert wait_gone([tree.main, *tree.pools], timeout=10) == []
    killed = outcomes(json_output(celery_supervise("-A", "demo", "kill", str(state), "--grace", "5", "--json",
                                                   cwd=cwd, env=env)))
    assert killed[orphan.pid]["status"] == "killed", killed[orphan.pid]
    assert killed[nohup_orphan.pid]["status"] == "spared", killed[nohup_orphan.pid]
    assert setsid_orphan.pid not in killed
    assert wait_gone([orphan], timeout=5) == []
    assert alive(nohup_orphan) and alive(setsid_orphan)
    assert real_procs.reap() == []
