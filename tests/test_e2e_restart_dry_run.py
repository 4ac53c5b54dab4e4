"""``restart --dry-run`` against a real supervisord and two real workers: it says what it would do, and does none of it.

``numprocs=2``, ``-c 1``, the guarded filesystem transport; each worker
also consumes a queue of its own, so the test picks where a task runs.
Worker 0 holds a finished ``spawn_family``'s leftovers, worker 1 runs a
``mark`` task (8 s, so it runs through the dry runs). The dry run (plain and ``--rolling``) must name both
processes, both nodes, the running task and the kill's verdicts (attached
"would kill", detached spared), and afterwards everything must be as it
was: the same worker PIDs, every leftover alive, no audit line, the task
finished on its own worker, and both workers still consuming (no drain).
"""

import json
import uuid

import pytest

from celery_supervise.processes import audit as auditing
from celery_supervise.processes.kill import SPARED, WOULD_KILL

from realsupervisor import PROGRAM
from taskfamily import ATTACHED, DETACHED, alive
from test_e2e_restart import finished_family, project, restart  # noqa: F401  (project is a fixture)

pytestmark = pytest.mark.e2e


def audit_lines(path):
    return auditing.read_lines(str(path))[0] if path.exists() else []


def test_restart_dry_run_says_what_it_would_do_and_does_nothing(supervisor, real_procs, project, audit_log):  # noqa: F811
    """Plain and --rolling, JSON and text: the plan, the task, the verdicts; then nothing has changed."""
    q = f"dry-{uuid.uuid4().hex[:8]}"
    run = supervisor(numprocs=2, concurrency=1, stopwaitsecs=10, project_dir=project,
                     queues=f"{q},{q}-%(process_num)d", node_prefix=f"{q}-")
    run.wait_nodes()
    nodes, old = sorted(run.node_names()), run.group_pids()
    families = finished_family(run, real_procs, f"{q}-0")
    task = run.celery.mark(hold=8, queue=f"{q}-1")  # runs through the three dry runs
    assert run.celery.wait_for_mark(task, "started")["worker"] == old[f"{PROGRAM}_1"]
    before = len(audit_lines(audit_log))

    text = restart(run, project, PROGRAM, "-c", str(run.conf_path), "--dry-run")
    plain = restart(run, project, PROGRAM, "-c", str(run.conf_path), "--dry-run", "--json")
    rolling = restart(run, project, PROGRAM, "-c", str(run.conf_path), "--dry-run", "--rolling", "--json")
    for result in (plain, rolling, text):
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    for doc in (json.loads(plain.stdout), json.loads(rolling.stdout)):
        assert doc["dry_run"] is True and doc["exit_code"] == 0
        full = {f"{PROGRAM}:{name}": pid for name, pid in old.items()}
        assert sorted(doc["processes"]) == sorted(full) and doc["running"] == full
        assert sorted(doc["old_nodes"]) == nodes
        assert [t["id"] for t in doc["tasks"]] == [task]
        kill = doc["kill"]
        assert kill["dry_run"] is True and kill["summary"]["killed"] == 0 and kill["audit"] is None
        verdicts = {p["pid"]: p["status"] for p in kill["processes"]}
        for family in families:
            assert all(verdicts[family.procs[r].pid] == WOULD_KILL for r in ATTACHED), verdicts
            assert all(verdicts[family.procs[r].pid] == SPARED for r in DETACHED), verdicts
    doc = json.loads(rolling.stdout)
    assert [b["processes"] for b in doc["batches"]] == [[p] for p in doc["processes"]]
    assert sorted(n for b in doc["batches"] for n in b["nodes"]) == nodes
    assert json.loads(plain.stdout)["batches"] is None
    assert "dry run: nothing drained, stopped, signalled or started" in text.stdout
    assert "would drain" in text.stdout and f"{task} demo.tasks.mark" in text.stdout, text.stdout

    # Nothing happened: same processes, every leftover alive, no signal logged,
    # the task finished where it ran, and both workers still take tasks.
    assert run.group_pids() == old
    for family in families:
        assert all(alive(p) for p in family.procs.values()), "the dry run signalled a leftover"
    assert run.celery.wait_for_mark(task, "done")["worker"] == old[f"{PROGRAM}_1"]
    for n in (0, 1):
        t = run.celery.mark(queue=f"{q}-{n}")
        assert run.celery.wait_for_mark(t, "done")["worker"] == old[f"{PROGRAM}_{n}"], "a worker was drained"
    assert len(audit_lines(audit_log)) == before

    # The real refusals still apply: a roll of both processes at once would leave no consumer.
    refused = restart(run, project, PROGRAM, "-c", str(run.conf_path), "--dry-run", "--rolling",
                      "--max-unavailable", "2")
    assert refused.returncode == 2 and refused.stdout == ""
    [line] = refused.stderr.splitlines()
    assert "no consumer" in line
    assert run.group_pids() == old
    assert real_procs.reap() == []
