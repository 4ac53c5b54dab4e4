"""``restart`` against a real supervisord and worker: filesystem transport, Redis, RabbitMQ.

Each test runs the worker (``-c 2``) from a private copy of the demo
project, and ``celery-supervise restart`` from that copy. A
``spawn_family`` task has left its children under one pool process::

    1000 celery worker (main)     stopped by supervisord (TERM, after the drain)
    ├── 1001 pool                 exits with it
    │   ├── sleep / sh → sleep    killed     attached
    │   ├── nohup sleep           spared     nohup
    │   └── sh (setsid) → sleep   spared     own session
    └── 1002 pool                 (busy test: runs a 5 s ``mark`` task)

On Redis (db 13, the restart tests' own) and RabbitMQ each test has its
own queue and node names, and removes its own keys (Redis: at the start and
the end) or queue afterwards.
"""

import json
import time
import uuid

import pytest

from celery_supervise.processes import audit as auditing

from brokers import RABBITMQ_URL, clean_redis, delete_rabbitmq_queues, require
from realprocs import wait_gone
from realsupervisor import PROGRAM, copy_project
from taskfamily import ATTACHED, DETACHED, Family, alive, celery_supervise, worker_tree

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/13"
#: The busy test's task: long enough that the drain visibly waits for it.
TASK_SECONDS = 5.0


@pytest.fixture(params=["filesystem", "redis", "rabbitmq"])
def broker(request):
    """``(url or None, uid)``; request it before ``supervisor`` so it outlives the worker."""
    uid = uuid.uuid4().hex[:8]
    url = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}.get(request.param)
    if url:
        require(url)
    if request.param == "redis":
        clean_redis(REDIS_URL, uid)
    yield url, uid
    if request.param == "redis":
        clean_redis(REDIS_URL, uid)
    elif request.param == "rabbitmq":
        delete_rabbitmq_queues(f"restart-{uid}", f"restart-{uid}-0", f"restart-{uid}-1")


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


def start(supervisor, broker, project):
    url, uid = broker
    run = supervisor(concurrency=2, stopwaitsecs=10, project_dir=project, broker_url=url,
                     queues=f"restart-{uid}" if url else None, node_prefix=f"restart{uid}-" if url else "demo")
    run.wait_nodes()
    return run, (f"restart-{uid}" if url else None)


def finished_family(run, real_procs, queue):
    """A ``spawn_family`` task that returned at once, leaving its six children; ``[Family]``."""
    marker = run.celery.wait_for_marker(run.celery.spawn_family(hold=0, lifetime=90, queue=queue))
    procs = dict(zip(marker["children"], real_procs.track(*marker["children"].values())))
    assert procs.keys() == marker["children"].keys(), f"a child died early: {marker}"
    return [Family(marker, procs)]


def restart(run, project, *args):
    return celery_supervise("-A", "demo", "restart", *args, cwd=project, env=run.env)


def check_restart(doc, run, old_pid, families):
    """What every successful restart must show: phases, gap, the old tree handled, the new worker up."""
    assert doc["exit_code"] == 0 and doc["problem"] is None, doc
    assert [p["name"] for p in doc["phases"]] == ["savepid", "drain", "stop", "kill", "start", "ready"]
    assert all(p["seconds"] >= 0 for p in doc["phases"])
    [node] = run.node_names()
    assert doc["old_nodes"] == [node] and list(doc["new_nodes"]) == [node]
    gap = doc["consume_gap"]
    # The gap spans the stop, kill and start at least, and ends at the ping.
    between = sum(p["seconds"] for p in doc["phases"] if p["name"] in ("stop", "kill", "start"))
    assert between <= gap <= between + sum(p["seconds"] for p in doc["phases"] if p["name"] in ("drain", "ready")) + 0.5
    assert doc["kill"]["summary"]["failed"] == 0
    assert doc["kill"]["summary"]["killed"] == len(ATTACHED) * len(families)
    assert doc["kill"]["summary"]["spared"] == len(DETACHED) * len(families)
    for family in families:
        assert not any(alive(family.procs[r]) for r in ATTACHED), "an attached leftover survived"
        assert all(alive(family.procs[r]) for r in DETACHED), "a detached child was killed"
    check_audit(doc, families)
    [new_pid] = run.worker_pids()
    assert new_pid != old_pid
    assert node in run.celery.ping()


def check_audit(doc, families):
    """The restart's kill logged its signals: each leftover's SIGTERM, never a detached process."""
    audit = doc["kill"]["audit"]
    assert audit["written"] is True, audit
    lines = [x for x in auditing.read_lines(audit["path"])[0] if x["run"] == audit["run"]]
    assert {x["command"]["verb"] for x in lines} == {"restart"} and len(lines) == audit["lines"]
    delivered = {x["process"]["pid"] for x in lines if x["outcome"] == auditing.DELIVERED}
    attached = {f.procs[r].pid for f in families for r in ATTACHED}
    # The leaves certainly got theirs; a shell above one may exit with it before its own turn (gone).
    assert {f.procs["plain"].pid for f in families} <= delivered <= attached
    assert not {x["process"]["pid"] for x in lines} & {f.procs[r].pid for f in families for r in DETACHED}


def test_restart_idle_worker(broker, supervisor, real_procs, project):
    """The worker holds no task: the drain is immediate; leftovers of a finished task are killed."""
    run, queue = start(supervisor, broker, project)
    tree = worker_tree(run, real_procs)
    families = finished_family(run, real_procs, queue)

    result = restart(run, project, PROGRAM, "-c", str(run.conf_path), "--json", "--grace", "3")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    doc = json.loads(result.stdout)
    check_restart(doc, run, tree.main.pid, families)
    assert wait_gone([tree.main, *tree.pools], 5) == []
    print(f"{broker[0] or 'filesystem'} idle: " + ", ".join(f"{p['name']} {p['seconds']:.2f}s" for p in doc["phases"])
          + f"; consume gap {doc['consume_gap']:.2f}s")
    # The new worker takes tasks.
    task = run.celery.mark(queue=queue)
    assert run.celery.wait_for_mark(task, "done")["worker"] == run.worker_pids()[0]
    assert real_procs.reap() == []


def test_restart_waits_for_a_running_task_and_loses_nothing(broker, supervisor, real_procs, project):
    """A 5 s task runs on one pool process: restart waits, it finishes on the old worker, once."""
    run, queue = start(supervisor, broker, project)
    tree = worker_tree(run, real_procs)
    families = finished_family(run, real_procs, queue)
    task = run.celery.mark(hold=TASK_SECONDS, queue=queue)
    started = run.celery.wait_for_mark(task, "started")

    result = restart(run, project, f"{PROGRAM}:*", "--supervisor-url", f"unix://{run.socket}", "--json",
                     "--grace", "3", "--drain-timeout", "30")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    doc = json.loads(result.stdout)
    done = run.celery.mark_record(task, "done")
    assert done is not None and done["worker"] == tree.main.pid, "the task did not finish on the old worker"
    drain = next(p for p in doc["phases"] if p["name"] == "drain")
    assert drain["seconds"] >= TASK_SECONDS - (time.time() - started["time"]) - 1
    check_restart(doc, run, tree.main.pid, families)
    # Not lost, and not run again by the new worker.
    assert run.celery.mark_record(task, "started")["worker"] == tree.main.pid
    print(f"{broker[0] or 'filesystem'} busy: " + ", ".join(f"{p['name']} {p['seconds']:.2f}s" for p in doc["phases"])
          + f"; consume gap {doc['consume_gap']:.2f}s")
    assert real_procs.reap() == []


def test_restart_of_two_processes_side_by_side(broker, supervisor, real_procs, project):
    """``numprocs=2``, named by the bare group: both drained, stopped, cleaned up and started.

    Worker 0 has a finished family's leftovers, worker 1 runs a 4 s task
    (each worker also consumes a queue of its own, so the test picks
    where a task runs). The task finishes on the old worker 1, worker 0's
    attached leftovers die and its detached children live, and both new
    workers answer, each with a consume gap of its own.
    """
    url, uid = broker
    q = f"restart-{uid}"
    run = supervisor(numprocs=2, concurrency=1, stopwaitsecs=10, project_dir=project, broker_url=url,
                     queues=f"{q},{q}-%(process_num)d", node_prefix=f"restart{uid}-")
    run.wait_nodes()
    nodes = run.node_names()
    old = run.group_pids()
    olds = real_procs.track(*old.values())
    families = finished_family(run, real_procs, f"{q}-0")
    task = run.celery.mark(hold=4, queue=f"{q}-1")
    assert run.celery.wait_for_mark(task, "started")["worker"] == old[f"{PROGRAM}_1"]

    result = restart(run, project, PROGRAM, "-c", str(run.conf_path), "--json", "--grace", "3",
                     "--drain-timeout", "30")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 0 and doc["problem"] is None, doc
    assert sorted(doc["old_nodes"]) == sorted(nodes) and sorted(doc["new_nodes"]) == sorted(nodes)
    assert sorted(doc["consume_gaps"]) == sorted(nodes) and doc["consume_gap"] == max(doc["consume_gaps"].values())
    assert run.celery.mark_record(task, "done")["worker"] == old[f"{PROGRAM}_1"]
    assert doc["kill"]["summary"]["killed"] == len(ATTACHED) and doc["kill"]["summary"]["spared"] == len(DETACHED)
    for family in families:
        assert not any(alive(family.procs[r]) for r in ATTACHED), "an attached leftover survived"
        assert all(alive(family.procs[r]) for r in DETACHED), "a detached child was killed"
    assert wait_gone(olds, 5) == []
    new = run.group_pids()
    assert sorted(new) == sorted(old) and set(new.values()).isdisjoint(old.values())
    assert set(run.celery.ping(timeout=2)) >= set(nodes)
    # Each new worker takes tasks from its own queue.
    for n in (0, 1):
        t = run.celery.mark(queue=f"{q}-{n}")
        assert run.celery.wait_for_mark(t, "done")["worker"] == new[f"{PROGRAM}_{n}"]
    assert real_procs.reap() == []


def test_unreachable_supervisord_stops_nothing(supervisor, real_procs, project, tmp_path):
    """Exit 1, one line on stderr, and the worker runs on, untouched (filesystem transport)."""
    run = supervisor(stopwaitsecs=5, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    result = restart(run, project, PROGRAM, "--supervisor-url", f"unix://{tmp_path}/nobody.sock")
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("celery-supervise: error: supervisord at unix://") and "not reachable" in line
    assert result.stdout == ""
    assert alive(tree.main) and run.worker_pids() == [tree.main.pid]
    assert run.states() == {f"{PROGRAM}:{PROGRAM}_0": "RUNNING"}


def test_manage_py_restart_refuses_to_stop_a_busy_worker_then_restarts_it(supervisor, real_procs, project):
    """``python manage.py celery restart``: a drain timeout exits 3 and stops nothing; a rerun finishes.

    The first run's drain cancels the worker's consumers, so it takes no
    new task; the task in hand goes on. The second run drains (the task
    finishes on the old worker) and restarts.
    """
    from test_e2e_drain import manage

    run = supervisor(concurrency=1, stopwaitsecs=10, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs, concurrency=1)
    task = run.celery.mark(hold=4)
    run.celery.wait_for_mark(task, "started")
    conf = str(run.conf_path)

    result = manage(project, "restart", PROGRAM, "-c", conf, "--drain-timeout", "0.5", env=run.env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith("CommandError: the drain timed out after ")
    assert "nothing was stopped" in result.stderr
    assert task in result.stdout  # the drain's table names the task
    assert run.worker_pids() == [tree.main.pid] and run.states() == {f"{PROGRAM}:{PROGRAM}_0": "RUNNING"}
    assert run.celery.mark_record(task, "done") is None

    result = manage(project, "restart", PROGRAM, "-c", conf, "--json", env=run.env)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert run.celery.mark_record(task, "done")["worker"] == tree.main.pid
    assert doc["consume_gap"] > 0 and [p["name"] for p in doc["phases"]][-1] == "ready"
    [new_pid] = run.worker_pids()
    assert new_pid != tree.main.pid and run.node_names()[0] in run.celery.ping()
    assert real_procs.reap() == []
