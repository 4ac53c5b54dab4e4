"""``celery-supervise deploy`` end to end: a real supervisord, worker, broker and task children.

Each test runs the demo worker (``-c 2``, ``stopwaitsecs=2``) from a private
copy of the demo project, with two running tasks that outlive the stop, and
deploys it::

    1000 celery worker (main)     stopped (TERM, then SIGKILL after 2 s)   gone
    ├── 1001 pool                 dies with it                             gone
    │   ├── sleep / sh → sleep    killed                                   attached
    │   ├── nohup sleep           spared                                   nohup
    │   └── sh (setsid) → sleep   spared                                   own session
    └── 1002 pool                 the same

The tasks are cut off by the stop: the deploy names them (the demo's task
journal says they never finished) and how to re-send them, or re-sends
them with ``--requeue``. The brokers: the guarded filesystem transport, and
Redis db 1 (flushed before and after each test that uses it; no other test
uses db 1).
"""

import json
import os
import re
import shutil
import socket

import pytest

from celery_supervise.processes import audit as auditing

from brokers import require
from realprocs import wait_for, wait_gone
from realsupervisor import copy_project
from taskfamily import ATTACHED, DETACHED, alive, celery_supervise, start_families, worker_tree

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/1"
PREFIX = "celery-supervise deploy: "
DEPLOY_TIMEOUT = 120


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


@pytest.fixture
def redis_db1():
    """Redis db 1, empty before and after the test (it is this file's alone)."""
    import redis

    require(REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


def deploy(run, project, *args, env=None):
    return celery_supervise("-A", "demo", "deploy", *args, cwd=project, env=env or run.env, timeout=DEPLOY_TIMEOUT)


def output(result):
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def kept_record(path):
    """The record a deploy kept in its private temp dir; removed by the caller once checked."""
    path = os.path.abspath(path)
    assert os.path.isfile(path) and os.path.basename(os.path.dirname(path)).startswith("celery-supervise-deploy-")
    return path


def check_summary(out, families=2):
    """The kill's summary: each family's 3 attached killed and 3 detached spared; the worker's 3 processes gone.

    Or killed: a pool process can still be dying of its main's SIGKILL
    (PR_SET_PDEATHSIG) when the kill comes right after the stop, and then
    the kill finishes it.
    """
    [(killed, gone)] = re.findall(rf"^killed (\d+), spared {3 * families}, already gone (\d+), refused 0, failed 0$",
                                  out, re.M)
    assert int(killed) >= 3 * families and int(killed) + int(gone) == 3 * families + 3, out


def check_processes(tree, families):
    assert wait_gone([tree.main, *tree.pools], timeout=5) == []
    assert wait_gone([f.procs[role] for f in families for role in ATTACHED], timeout=5) == []
    assert all(alive(f.procs[role]) for f in families for role in DETACHED)


def check_audit(audit_log, state, tree, families):
    """The deploy's kill logged its signals: the leftovers' SIGTERMs, never a detached process."""
    lines, bad = auditing.read_lines(str(audit_log))
    assert bad == 0 and lines
    assert {(x["command"]["verb"], x["record"]) for x in lines} == {("deploy", os.path.abspath(state))}
    delivered = {x["process"]["pid"] for x in lines if x["outcome"] == auditing.DELIVERED}
    attached = {f.procs[role].pid for f in families for role in ATTACHED}
    # The leaves certainly got their SIGTERM; a shell above one may exit with it before its own turn (gone).
    assert {f.procs["plain"].pid for f in families} <= delivered <= attached | {tree.main.pid, *(p.pid for p in tree.pools)}
    named = {x["process"]["pid"] for x in lines}
    assert not named & {f.procs[role].pid for f in families for role in DETACHED}
    assert all(r["outcome"] is not None for r in auditing.join(lines))


def new_daemon(run, real_procs, old_worker):
    """The supervisord the deploy started (daemonized, found by its socket) and its new worker, tracked."""
    daemon = run.daemon()
    assert daemon is not None and daemon.pid != run.pid
    [info] = run.proxy().supervisor.getAllProcessInfo()
    assert info["statename"] in ("STARTING", "RUNNING") and info["pid"] != old_worker.pid, info
    [worker] = real_procs.track(info["pid"])
    real_procs.track(*worker.children())
    return daemon


def stop_daemon(run, daemon):
    result = run.ctl("shutdown")
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_gone([daemon], timeout=30) == []


def test_deploy_restarts_cleanly_and_names_the_tasks_the_stop_cut_off(supervisor, real_procs, project, audit_log):
    run = supervisor(stopwaitsecs=2, project_dir=project, nodaemon=False)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=2)

    result = deploy(run, project, "-c", str(run.conf_path), "--grace", "5")
    assert result.returncode == 0, output(result)
    err, out = result.stderr, result.stdout
    [state] = re.findall(rf"^{PREFIX}1/4 recording worker trees and active tasks in (\S+)$", err, re.M)
    for line in (f"2/4 supervisorctl shutdown (supervisord PID {run.pid})",
                 "3/4 killing what the workers left behind (grace 5s)", "4/4 starting supervisord",
                 "waiting for 1 worker(s) to answer a ping (at most 60s)"):
        assert f"{PREFIX}{line}\n" in err, output(result)
    [new_pid] = re.findall(rf"^{PREFIX}done: supervisord is running \(PID (\d+)\), 1 worker\(s\) answered a ping$",
                           err, re.M)
    check_summary(out)
    assert [line.split()[0] for line in out.splitlines() if re.match(r"^\w+ +\d+\.\d\ds  ", line)] == [
        "savepid", "shutdown", "kill", "start", "ready"], output(result)

    # Every task the stop cut off is named, and how to re-send it; the record is kept for that.
    assert "tasks: 2 running at savepid; finished since: 0; did not finish: 2:" in out, output(result)
    for family in families:
        assert re.search(rf"^  cut off +{family.task_id} demo.tasks.spawn_family \(demo0@{socket.gethostname()}\): "
                         r"interrupted \(journal: never finished\) \[would re-send\]$", out, re.M), output(result)
    assert f"re-send them with: celery-supervise -A demo requeue {state}\n" in out
    assert f"record: {state}\n" in out
    kept = kept_record(state)

    check_processes(tree, families)
    check_audit(audit_log, state, tree, families)
    assert run.proc.poll() == 0
    daemon = new_daemon(run, real_procs, tree.main)
    assert daemon.pid == int(new_pid)
    assert run.celery.ping() == [f"demo0@{socket.gethostname()}"]
    stop_daemon(run, daemon)
    shutil.rmtree(os.path.dirname(kept))
    assert real_procs.reap() == []


def test_deploy_json_on_redis(supervisor, real_procs, project, redis_db1):
    run = supervisor(stopwaitsecs=2, project_dir=project, nodaemon=False, broker_url=redis_db1)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=2)

    result = deploy(run, project, "-c", str(run.conf_path), "--grace", "5", "--json")
    assert result.returncode == 0, output(result)
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 0 and doc["problem"] is None and doc["dry_run"] is False and doc["shutdown"] is True
    assert [p["name"] for p in doc["phases"]] == ["savepid", "shutdown", "kill", "start", "ready"]
    assert doc["save"]["workers"] == 1 and doc["save"]["tasks"] == 2 and doc["save"]["source"] == "supervisor+control"
    assert doc["processes"] == ["celery-worker:celery-worker_0"]
    summary = doc["kill"]["summary"]
    assert (summary["spared"], summary["failed"], summary["killed"] + summary["gone"]) == (6, 0, 9)
    statuses = {p["pid"]: p["status"] for p in doc["kill"]["processes"]}
    for family in families:
        assert {statuses[pid] for pid in family.pids(*ATTACHED)} == {"killed"}
        assert {statuses[pid] for pid in family.pids(*DETACHED)} == {"spared"}
    assert sorted((t["id"], t["fate"], t["action"], t["left_to_resend"]) for t in doc["tasks"]) == sorted(
        (f.task_id, "cut off", "would re-send", True) for f in families)
    assert doc["requeue"] is None  # no --requeue: its decisions only
    state = kept_record(doc["state_file"])
    assert doc["requeue_command"] == f"celery-supervise -A demo requeue {state}"
    assert doc["supervisord"]["old_pid"] == run.pid and doc["supervisord"]["new_pid"] not in (None, run.pid)
    assert list(doc["new_nodes"]) == [f"demo0@{socket.gethostname()}"]

    check_processes(tree, families)
    daemon = new_daemon(run, real_procs, tree.main)
    assert daemon.pid == doc["supervisord"]["new_pid"]
    stop_daemon(run, daemon)
    shutil.rmtree(os.path.dirname(state))
    assert real_procs.reap() == []


def test_deploy_dry_run_and_a_failed_savepid_stop_nothing(supervisor, real_procs, project, tmp_path):
    run = supervisor(stopwaitsecs=2, project_dir=project, nodaemon=False)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=1)

    dry = deploy(run, project, "-c", str(run.conf_path), "--dry-run")
    assert dry.returncode == 0, output(dry)
    assert f"{PREFIX}dry run: this is what kill would do after the shutdown\n" in dry.stderr, output(dry)
    assert "2/4" not in dry.stderr
    assert "would kill 6, spared 3, already gone 0, refused 0, failed 0" in dry.stdout, output(dry)
    assert re.search(rf"^  running +{families[0].task_id} demo.tasks.spawn_family ", dry.stdout, re.M), output(dry)
    assert "record:" not in dry.stdout  # its private temp file is gone
    [state] = re.findall(rf"^{PREFIX}1/4 recording worker trees and active tasks in (\S+)$", dry.stderr, re.M)
    assert not os.path.exists(os.path.dirname(state))

    # The broker down: savepid cannot record the tasks (its exit 3), so nothing is stopped.
    env = dict(run.env, CELERY_BROKER_URL="redis://127.0.0.1:1/1")
    failed = deploy(run, project, "-c", str(run.conf_path), "--state", str(tmp_path / "state.json"), env=env)
    assert failed.returncode == 1, output(failed)
    assert "the broker failed" in failed.stderr
    assert failed.stderr.rstrip().splitlines()[-1] == f"{PREFIX}error: savepid failed; nothing was stopped"
    assert "2/4" not in failed.stderr

    assert run.proc.poll() is None and run.worker_pids() == [tree.main.pid]
    assert all(alive(p) for p in (tree.main, *tree.pools, *families[0].procs.values()))
    assert run.celery.ping() == [f"demo0@{socket.gethostname()}"]


def test_deploy_requeue_resends_what_the_stop_cut_off(supervisor, real_procs, project, redis_db1, tmp_path):
    run = supervisor(stopwaitsecs=2, project_dir=project, nodaemon=False, broker_url=redis_db1)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    gate = tmp_path / "gate"
    gate.touch()
    # Two tasks that hold until the gate is gone (at most 60 s): the stop cuts both off.
    ids = [run.celery.app.send_task("demo.tasks.mark", kwargs={
        "marker_dir": str(run.marker_dir), "hold": 60, "gate": str(gate)}).id for _ in range(2)]
    for task_id in ids:
        run.celery.wait_for_mark(task_id, "started")

    result = deploy(run, project, "-c", str(run.conf_path), "--grace", "5", "--requeue")
    assert result.returncode == 0, output(result)
    assert f"{PREFIX}4/5 re-sending the tasks the stop cut off\n" in result.stderr
    assert f"{PREFIX}5/5 starting supervisord\n" in result.stderr
    assert re.search(r"^requeue +\d+\.\d\ds  re-sent 2, skipped 0 of 2 recorded task\(s\)$", result.stdout, re.M), \
        output(result)
    for task_id in ids:
        assert re.search(rf"^  cut off +{task_id} demo.tasks.mark .*: interrupted \(journal: never finished\) "
                         r"\[re-sent\]$", result.stdout, re.M), output(result)
    assert "re-send them with" not in result.stdout and "record:" not in result.stdout  # nothing left to re-send

    gate.unlink()  # the runs the new worker took up finish at once
    for task_id in ids:
        run.celery.wait_for_mark(task_id, "done", timeout=30)
        runs = (run.marker_dir / f"{task_id}.runs").read_text().splitlines()
        assert len(runs) == 2 and json.loads(runs[0])["worker"] == tree.main.pid != json.loads(runs[1])["worker"]
    daemon = new_daemon(run, real_procs, tree.main)
    stop_daemon(run, daemon)
    assert real_procs.reap() == []


def test_deploy_no_shutdown_restarts_the_programs_and_keeps_supervisord(supervisor, real_procs, project):
    run = supervisor(stopwaitsecs=2, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=2)
    name = "celery-worker:celery-worker_0"

    result = deploy(run, project, "-c", str(run.conf_path), "--no-shutdown", "--grace", "5")
    assert result.returncode == 0, output(result)
    err = result.stderr
    for line in (f"2/4 stopping {name} (supervisord PID {run.pid})",
                 "3/4 killing what the workers left behind (grace 5s)", f"4/4 starting {name}",
                 f"done: {name} running again under supervisord (PID {run.pid}), 1 worker(s) answered a ping"):
        assert f"{PREFIX}{line}\n" in err, output(result)
    check_summary(result.stdout)
    assert [line.split()[0] for line in result.stdout.splitlines() if re.match(r"^\w+ +\d+\.\d\ds  ", line)] == [
        "savepid", "stop", "kill", "start", "ready"], output(result)
    [state] = re.findall(r"^record: (\S+)$", result.stdout, re.M)  # the tasks were cut off: kept

    check_processes(tree, families)
    assert run.proc.poll() is None  # the same supervisord throughout
    [new_pid] = run.worker_pids()
    assert new_pid != tree.main.pid
    real_procs.track(new_pid)
    wait_for(lambda: run.celery.ping() == [f"demo0@{socket.gethostname()}"], 10, "the new worker to answer")
    shutil.rmtree(os.path.dirname(kept_record(state)))
    assert real_procs.reap() == []
