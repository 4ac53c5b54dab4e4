"""The deploy flow with celery-supervise, against a real supervisord and Celery worker.

``savepid`` before the stop, ``supervisorctl shutdown``, ``kill`` after it,
with two ``spawn_family`` tasks running, one per pool process::

    1000 celery worker (main)      gone: supervisord SIGKILLed it (stopwaitsecs=2)
    ├── 1001 pool                  gone: the kernel killed it (PR_SET_PDEATHSIG)
    │   ├── 1010 sleep             killed   attached orphan of the worker
    │   ├── 1011 sh                killed   attached orphan of the worker
    │   │   └── 1012 sleep         killed   attached to the worker
    │   ├── 1013 nohup sleep       spared   nohup
    │   └── 1014 sh (setsid)       spared   own session
    │       └── 1015 sleep         spared   child of spared 1014
    └── 1002 pool                  the same again

Each supervisord runs the worker from its own copy of the demo project
(:func:`realsupervisor.copy_project`), and the commands run from that copy:
workers of other tests or of a benchmark running at the same time belong to
another project, which savepid never records.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from realprocs import wait_for, wait_gone
from realsupervisor import BIN, DemoClient, copy_project
from taskfamily import (
    ATTACHED, DETACHED, alive, celery_supervise, identities, json_output, kill_statuses, outcomes,
    recorded_verdicts, shutdown, start_families, worker_tree,
)

DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
def project(tmp_path):
    """A private copy of the demo project; the worker and the commands run from it."""
    return copy_project(tmp_path / "project")


@pytest.mark.e2e
@pytest.mark.parametrize("stopsignal", ["QUIT", "TERM"])
def test_deploy_flow_kills_attached_and_spares_detached(supervisor, real_procs, project, tmp_path, stopsignal):
    run = supervisor(stopsignal=stopsignal, stopwaitsecs=2, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=2)
    assert sorted(f.pool_pid for f in families) == sorted(p.pid for p in tree.pools)
    state = tmp_path / "state.json"

    # savepid: the whole tree, the verdicts and the active tasks.
    record = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=project, env=run.env))
    assert json.loads(state.read_text())["workers"] == record["workers"]
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    assert record["source"] == "control"
    [worker] = record["workers"]
    assert worker["main"] == tree.main.pid
    assert worker["node"] == f"demo0@{socket.gethostname()}"
    roles = {p["pid"]: p["role"] for p in worker["procs"]}
    assert roles == {
        tree.main.pid: "main",
        **{p.pid: "pool" for p in tree.pools},
        **{pid: "task" for f in families for pid in f.pids(*ATTACHED, *DETACHED)},
    }
    assert {t["id"]: t["worker_pid"] for t in worker["tasks"]} == {f.task_id: f.pool_pid for f in families}
    assert {t["name"] for t in worker["tasks"]} == {"demo.tasks.spawn_family"}
    expected = tree.verdicts()
    for family in families:
        expected.update(family.verdicts())
    assert recorded_verdicts(record) == expected

    shutdown(run)
    assert wait_gone([tree.main, *tree.pools], timeout=10) == []
    family_procs = [p for f in families for p in f.procs.values()]
    assert all(alive(p) for p in family_procs), "supervisord itself killed a task child"

    # kill: exactly the attached leftovers die.
    result = celery_supervise("kill", str(state), "--json", "--grace", "5", cwd=project, env=run.env)
    report = json_output(result)
    assert report["exit_code"] == 0 and report["dry_run"] is False
    done = outcomes(report)
    assert {pid: p["status"] for pid, p in done.items()} == kill_statuses(tree, families)
    for family in families:
        for pid in family.pids(*ATTACHED):
            assert done[pid]["reason"].startswith("attached"), done[pid]
        for pid in family.pids(*DETACHED):
            assert done[pid]["reason"] == family.verdicts()[pid][1]
    assert report["summary"] == {"killed": 6, "spared": 6, "gone": 3, "refused": 0, "failed": 0, "would kill": 0}
    survivors = {p.pid for p in (tree.main, *tree.pools, *family_procs) if alive(p)}
    assert survivors == {pid for f in families for pid in f.pids(*DETACHED)}

    # The survivors are this test's to clean up, by PID and identity.
    assert real_procs.reap() == []


@pytest.mark.e2e
def test_status_supervisor_url_savepid_and_dry_run_change_nothing(supervisor, real_procs, project, tmp_path):
    """The commands that only read: each shows the right tree and signals nothing.

    ``status`` (with the app), ``savepid`` through supervisord's XML-RPC with
    no app at all, and, after the shutdown, ``kill --dry-run`` of that
    record. A real kill of the same record cleans up at the end.
    """
    run = supervisor(stopwaitsecs=2, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    [family] = start_families(run.celery, real_procs, count=1)
    everything = [tree.main, *tree.pools, *family.procs.values()]
    before = identities(everything)
    assert len(before) == 9
    expected = {**tree.verdicts(), **family.verdicts()}

    status = json_output(celery_supervise("-A", "demo", "status", "--json", cwd=project, env=run.env))
    [worker] = status["workers"]
    assert worker["main"] == tree.main.pid
    assert [(t["id"], t["worker_pid"]) for t in worker["tasks"]] == [(family.task_id, family.pool_pid)]
    assert recorded_verdicts(status) == expected
    assert identities(everything) == before

    state = tmp_path / "state.json"
    record = json_output(celery_supervise(
        "savepid", str(state), "--supervisor-url", f"unix://{run.socket}", "--program", "celery-worker*", "--json",
        cwd=tmp_path, env=run.env,
    ))
    assert record["source"] == "supervisor"
    [worker] = record["workers"]
    assert worker["main"] == tree.main.pid
    assert worker["program"] == "celery-worker:celery-worker_0"
    assert worker["supervisor_pid"] == run.pid
    assert worker["tasks"] == []  # only Celery knows them, and no app was named
    assert recorded_verdicts(record) == expected
    assert identities(everything) == before

    shutdown(run)
    leftovers = list(family.procs.values())
    before = identities(leftovers)
    assert len(before) == 6
    dry = json_output(celery_supervise("kill", str(state), "--dry-run", "--json", cwd=tmp_path, env=run.env))
    assert dry["dry_run"] is True
    statuses = {pid: p["status"] for pid, p in outcomes(dry).items()}
    assert statuses == {
        pid: ("would kill" if kind == "killed" else kind) for pid, kind in kill_statuses(tree, [family]).items()
    }
    assert identities(leftovers) == before

    report = json_output(celery_supervise("kill", str(state), "--grace", "5", "--json", cwd=tmp_path, env=run.env))
    assert {pid: p["status"] for pid, p in outcomes(report).items()} == kill_statuses(tree, [family])
    assert {p.pid for p in leftovers if alive(p)} == family.pids(*DETACHED)
    assert real_procs.reap() == []


@pytest.mark.e2e
def test_savepid_without_broker_records_local_trees_and_warns(supervisor, real_procs, project, tmp_path):
    """The worker is on its filesystem broker; savepid is pointed at a dead Redis.

    It still records the tree it finds by scanning (pool processes known by
    their command line), says in one error line that the tasks are missing,
    and exits 3 (partial: a deploy script under ``set -e`` stops before the
    stop, see "Faults and what happens"); the kill of that record still does
    the job.
    """
    run = supervisor(stopwaitsecs=2, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    [family] = start_families(run.celery, real_procs, count=1)
    state = tmp_path / "state.json"

    env = dict(run.env, CELERY_BROKER_URL=DEAD_BROKER)
    result = celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=project, env=env)
    assert result.returncode == 3, result.stderr
    record = json.loads(result.stdout)
    errors = [line for line in result.stderr.splitlines() if line.startswith("celery-supervise: error: ")]
    assert len(errors) == 1 and "the broker failed" in errors[0], result.stderr
    # kombu masks the URL's password, so match on the address.
    assert "127.0.0.1:1/0 did not answer" in record["broker_error"]
    assert record["source"] == "scan"
    [worker] = record["workers"]
    assert worker["main"] == tree.main.pid
    assert worker["tasks"] == []
    assert recorded_verdicts(record) == {**tree.verdicts(), **family.verdicts()}

    shutdown(run)
    report = json_output(celery_supervise("kill", str(state), "--grace", "5", "--json", cwd=project, env=run.env))
    assert {pid: p["status"] for pid, p in outcomes(report).items()} == kill_statuses(tree, [family])
    assert {p.pid for p in family.procs.values() if alive(p)} == family.pids(*DETACHED)
    assert real_procs.reap() == []


@pytest.mark.e2e
def test_another_projects_worker_is_never_recorded_nor_killed(supervisor, real_procs, project, tmp_path):
    """Same app name, same host, another folder: not ours.

    The other worker is ``celery -A demo worker -n other@%h`` run from a
    second copy of the demo project, on its own broker, with a task of its
    own. savepid from our project leaves it out, and our kill touches none
    of its processes.
    """
    other_dir = copy_project(tmp_path / "other")
    other_broker, other_markers = tmp_path / "other-broker", tmp_path / "other-markers"
    other_markers.mkdir()
    with open(tmp_path / "other-worker.log", "wb") as log:
        other = real_procs.spawn(
            [str(BIN / "celery"), "-A", "demo", "worker", "-l", "info", "-c", "1", "-n", "other@%h"],
            cwd=other_dir, env=dict(os.environ, CELERY_SUPERVISE_BROKER_DIR=str(other_broker)),
            stdout=log, stderr=subprocess.STDOUT, process_group=0,
        )
    run = supervisor(stopwaitsecs=2, project_dir=project)
    client = DemoClient(other_broker, other_markers)
    try:
        def other_answers():
            assert other.poll() is None, (tmp_path / "other-worker.log").read_text()
            return client.ping()

        wait_for(other_answers, 45, "the other project's worker to answer a ping", interval=0.1)
        run.wait_ready()
        tree = worker_tree(run, real_procs)
        [ours] = start_families(run.celery, real_procs, count=1)
        [theirs] = start_families(client, real_procs, count=1)
        their_procs = [other, *real_procs.track(*other.children()), *theirs.procs.values()]
        before = identities(their_procs)
        assert len(before) == 8  # main, one pool process, six task children
        state = tmp_path / "state.json"

        record = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=project, env=run.env))
        assert [w["main"] for w in record["workers"]] == [tree.main.pid]
        assert {p["pid"] for w in record["workers"] for p in w["procs"]}.isdisjoint(before)

        shutdown(run)
        report = json_output(celery_supervise("kill", str(state), "--grace", "5", "--json", cwd=project, env=run.env))
        assert {pid: p["status"] for pid, p in outcomes(report).items()} == kill_statuses(tree, [ours])
        assert identities(their_procs) == before
    finally:
        client.close()
    # SIGKILL, not a warm shutdown that would wait for the task; the kernel
    # takes the pool process with it, the reap the rest.
    other.send_signal(signal.SIGKILL)
    assert real_procs.reap() == []


def test_savepid_with_no_worker_writes_an_empty_record(project, tmp_path):
    """No worker of this project runs (a fresh copy), so the record is empty; kill of it does nothing."""
    env = dict(os.environ, CELERY_SUPERVISE_BROKER_DIR=str(tmp_path / "broker"))
    state = tmp_path / "state.json"

    result = celery_supervise("-A", "demo", "savepid", str(state), cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert "warning: no Celery worker is running on this host; wrote an empty record" in result.stderr
    assert result.stdout.startswith("recorded 0 worker(s), 0 process(es), 0 active task(s)")
    record = json.loads(state.read_text())
    assert record["workers"] == [] and record["verdicts"] == []

    result = celery_supervise("kill", str(state), cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "killed 0, spared 0, already gone 0, refused 0, failed 0"


@pytest.mark.e2e
def test_old_pid_list_acts_only_on_live_celery_workers(supervisor, real_procs, project, tmp_path):
    """The old script's file: bare worker_pids. Only live Celery workers are acted on.

    The file names both pool processes (what ``inspect().active()`` gave
    the old script) and a stranger's PID; the stranger is refused, the
    pools die with their attached descendants, the detached ones live.
    """
    run = supervisor(project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=2)
    stranger = real_procs.spawn(["sleep", "60"])
    old = tmp_path / "celery-worker-pid.txt"
    old.write_text(" ".join(str(p) for p in [*(f.pool_pid for f in families), stranger.pid]) + "\n")
    os.chmod(old, 0o600)

    result = celery_supervise("-A", "demo", "kill", str(old), "--json", "--grace", "5", cwd=project, env=run.env)
    assert "bare PID list" in result.stderr
    done = outcomes(json_output(result))
    assert done[stranger.pid]["status"] == "refused"
    assert done[stranger.pid]["reason"] == "not a Celery worker (PID recycled?)"
    assert alive(stranger)
    for family in families:
        assert done[family.pool_pid]["status"] == "killed"
        for key in ATTACHED:
            assert not alive(family.procs[key])
        for key in DETACHED:
            assert alive(family.procs[key])
    assert alive(tree.main)  # not in the file: the old format never named it
    shutdown(run)
    assert real_procs.reap() == []


def worker_env(tmp_path, name):
    """The environment of worker *name*: a broker folder and a journal of its own."""
    return dict(os.environ, CELERY_SUPERVISE_BROKER_DIR=str(tmp_path / f"{name}-broker"),
                CELERY_SUPERVISE_JOURNAL_DIR=str(tmp_path / f"{name}-journal"))


def start_worker(real_procs, folder, tmp_path, name, celery=(str(BIN / "celery"),)):
    """``celery -A demo worker -c 1`` run from *folder*, on a broker folder of its own; its main and pool."""
    log = tmp_path / f"{name}.log"
    env = worker_env(tmp_path, name)
    with open(log, "wb") as out:
        main = real_procs.spawn([*celery, "-A", "demo", "worker", "-l", "info", "-c", "1", "-n", f"{name}@%h"],
                                cwd=str(folder), env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0)
    wait_for(lambda: b" ready." in log.read_bytes() or main.poll() is not None, 45, f"worker {name} to be ready")
    assert main.poll() is None, log.read_text(errors="replace")
    return [main, *real_procs.track(*main.children())]


@pytest.mark.e2e
def test_old_pid_list_naming_the_same_apps_worker_of_another_project(real_procs, project, tmp_path):
    """Two projects call their app ``demo``: a bare PID file naming the other one's worker signals nothing.

    savepid's scan tells them apart by the folder the package is imported
    from; the bare-PID path now does the same (it used to compare app names
    only, and killed the other project's whole tree).
    """
    other = copy_project(tmp_path / "other-project")
    ours = start_worker(real_procs, project, tmp_path, "ours")
    theirs = start_worker(real_procs, other, tmp_path, "theirs")
    before = identities(theirs)
    old = tmp_path / "celery-worker-pid.txt"
    old.write_text(" ".join(str(p.pid) for p in theirs) + "\n")
    os.chmod(old, 0o600)

    result = celery_supervise("-A", "demo", "kill", str(old), "--json", "--grace", "5", cwd=project, env=os.environ)
    done = outcomes(json_output(result))
    assert {pid: (d["status"], d["reason"]) for pid, d in done.items()} == {
        p.pid: ("refused", f"a worker of another project (demo in {other}, ours is in {project})") for p in theirs}
    assert json_output(result)["summary"]["killed"] == 0
    assert identities(theirs) == before, "a process of the other project was signalled"
    assert all(alive(p) for p in ours)
    assert real_procs.reap(timeout=10) == []


# ``celery`` as a virtualenv's console script runs it, but Celery's start-up
# time is read STEP seconds early: what the worker's wall clock says once the
# machine's clock has been set ahead by STEP seconds after the worker started
# (the clock itself is never set here). Named ``celery`` so the scan takes it
# for a worker, as ``python …/bin/celery -A demo worker``.
CLOCK_SET_AHEAD = """
import sys
from datetime import timedelta

from celery.worker import worker

_init = worker.WorkController.__init__


def _started_before_the_step(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.startup_time -= timedelta(seconds={step})


worker.WorkController.__init__ = _started_before_the_step

from celery.__main__ import main

sys.exit(main())
"""


@pytest.mark.e2e
def test_savepid_confirms_a_worker_whose_clock_was_set_ahead(real_procs, project, tmp_path):
    """Celery's ``uptime`` is wall-clock time: after the clock is set ahead, the worker claims to be older.

    savepid took such a reply for another host's worker that happens to
    have the same name and PID ("ignored reply … is not that worker on this
    host"), fell back to the process scan, and the record lost the active
    task that requeue would re-send. Its pool processes, children of that
    PID here, prove it is ours whatever the clock says.
    """
    launcher = tmp_path / "stepped" / "celery"
    launcher.parent.mkdir()
    launcher.write_text(CLOCK_SET_AHEAD.format(step=120))
    main, pool = start_worker(real_procs, project, tmp_path, "stepped", celery=(sys.executable, str(launcher)))
    env = worker_env(tmp_path, "stepped")
    sent = subprocess.run([str(BIN / "celery"), "-A", "demo", "call", "demo.tasks.sleep_task", "--args", "[60]"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    state = tmp_path / "state.json"

    def recorded():  # until the worker has taken the task, or savepid warns
        doc = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=project, env=env))
        return doc if doc["warnings"] or (doc["workers"] and doc["workers"][0]["tasks"]) else None

    doc = wait_for(recorded, 45, "savepid to record the running task")
    assert (doc["source"], doc["warnings"]) == ("control", [])
    [worker] = doc["workers"]
    assert worker["main"] == main.pid
    assert [t["id"] for t in worker["tasks"]] == [task_id]
    roles = {p["pid"]: p["role"] for p in worker["procs"]}
    assert roles[pool.pid] == "pool"
