"""Snapshot and kill against real processes, without Celery (fast).

The tree comes from ``tests/programs/fake_worker.py``, which forks like a
prefork worker and starts plain, nohup'd and setsid'd children::

    main (group leader, like under supervisord)   kill
    ├── pool                                      kill
    │   ├── sleep               (plain)           kill
    │   ├── sh ── sleep         (parent, grandchild) kill
    │   ├── nohup sleep                           spare  nohup
    │   └── sleep in a new session                spare  own session
    └── pool                                      (the same again)

The real Celery worker under a real supervisord is in the e2e tests.
"""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from celery_supervise.processes import plan, snapshot, statefile
from celery_supervise.processes.plan import Policy
from celery_supervise.processes.procs import MAIN, POOL, TASK, read_proc

from realprocs import wait_for

FAKE_WORKER = os.path.join(os.path.dirname(__file__), "programs", "fake_worker.py")
LIFETIME = 60


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "celery_supervise", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def fake_worker(real_procs, tmp_path):
    """Start the fake worker; return its PIDs by name once every process exists."""
    out = tmp_path / "fake"
    out.mkdir()
    main = real_procs.spawn([sys.executable, FAKE_WORKER, str(out), str(LIFETIME)], process_group=0)
    info = wait_for(lambda: _load(out / "main.json"), 30, "fake worker main.json")
    pools = [_load(out / f"pool-{p}.json") for p in info["pools"]]
    real_procs.track(*info["pools"], *(pid for p in pools for k, pid in p.items() if k != "pool"))
    assert info["main"] == main.pid
    return {"main": main.pid, "pools": pools}


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def pids(fw, *kinds):
    return {p[k] for p in fw["pools"] for k in kinds}


def write_state(path, worker, policy=Policy()):
    snap = snapshot.take([worker], "test")
    statefile.write(str(path), statefile.to_document(snap, policy, plan.plan([worker], policy)))
    return str(path)


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_snapshot_roles_and_identity(fake_worker):
    w = snapshot.read_worker(fake_worker["main"])
    roles = {p.pid: p.role for p in w.procs}
    assert roles[fake_worker["main"]] == MAIN
    assert {pid for pid, r in roles.items() if r == POOL} == pids(fake_worker, "pool")
    tasks = pids(fake_worker, "plain", "parent", "grandchild", "nohup", "setsid")
    assert {pid for pid, r in roles.items() if r == TASK} == tasks
    by_pid = w.by_pid()
    assert all(by_pid[p].sighup_ignored for p in pids(fake_worker, "nohup"))
    assert not any(by_pid[p].sighup_ignored for p in pids(fake_worker, "plain", "pool"))
    assert all(by_pid[p].sid == by_pid[p].pid for p in pids(fake_worker, "setsid"))
    assert all(by_pid[p].pgid == fake_worker["main"] for p in pids(fake_worker, "plain", "grandchild", "nohup"))


def test_kill_kills_attached_and_spares_detached(fake_worker, tmp_path):
    w = snapshot.read_worker(fake_worker["main"])
    state = write_state(tmp_path / "state.json", w)
    res = cli("kill", state, "--grace", "5", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    by_status = {}
    for p in doc["processes"]:
        by_status.setdefault(p["status"], set()).add(p["pid"])
    attached = {fake_worker["main"]} | pids(fake_worker, "pool", "plain", "parent", "grandchild")
    detached = pids(fake_worker, "nohup", "setsid")
    assert by_status == {"killed": attached, "spared": detached}
    assert not any(alive(p) for p in attached)
    assert all(alive(p) for p in detached)
    reasons = {p["pid"]: p["reason"] for p in doc["processes"]}
    assert {reasons[p] for p in pids(fake_worker, "nohup")} == {"nohup"}
    assert {reasons[p] for p in pids(fake_worker, "setsid")} == {"own session"}


def test_dry_run_signals_nothing(fake_worker, tmp_path):
    w = snapshot.read_worker(fake_worker["main"])
    state = write_state(tmp_path / "state.json", w)
    res = cli("kill", state, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "would kill 9, spared 4" in res.stdout
    assert all(alive(p.pid) for p in w.procs)


def test_kill_catches_orphans_born_after_the_snapshot(fake_worker, tmp_path, real_procs):
    """supervisord SIGKILLs the main; a pool forks on; both leave the tree we recorded."""
    w = snapshot.read_worker(fake_worker["main"])
    state = write_state(tmp_path / "state.json", w)
    # Born after the snapshot, into the worker's process group (as a task's
    # child would be), then orphaned when its parent dies.
    late = real_procs.spawn(["sh", "-c", f"sleep {LIFETIME} & echo $! > {tmp_path}/late; wait"],
                            process_group=fake_worker["main"])
    late_child = wait_for(lambda: _int(tmp_path / "late"), 10, "late grandchild")
    real_procs.track(late_child)
    os.kill(late.pid, signal.SIGKILL)
    late.wait(10)
    os.kill(fake_worker["main"], signal.SIGKILL)
    wait_for(lambda: read_proc(late_child) and read_proc(late_child).ppid != late.pid, 10, "re-parenting")
    res = cli("kill", state, "--grace", "5", "--json")
    assert res.returncode == 0, res.stderr
    doc = {p["pid"]: p for p in json.loads(res.stdout)["processes"]}
    assert doc[late_child]["status"] == "killed"
    assert doc[late_child]["reason"] == "attached orphan of the worker"
    assert doc[fake_worker["main"]]["status"] in ("gone", "killed")  # a zombie until pytest reaps it
    assert not alive(late_child)
    assert all(alive(p) for p in pids(fake_worker, "nohup", "setsid"))


def _int(path):
    try:
        return int(open(path).read())
    except (FileNotFoundError, ValueError):
        return None


def test_kill_is_idempotent(fake_worker, tmp_path):
    w = snapshot.read_worker(fake_worker["main"])
    state = write_state(tmp_path / "state.json", w)
    assert cli("kill", state, "--grace", "5").returncode == 0
    res = cli("kill", state, "--grace", "5", "--json")
    assert res.returncode == 0, res.stderr
    statuses = {p["pid"]: p["status"] for p in json.loads(res.stdout)["processes"]}
    assert {s for pid, s in statuses.items() if pid not in pids(fake_worker, "nohup", "setsid")} == {"gone"}


def test_kill_refuses_our_own_ancestors(fake_worker, tmp_path):
    """A record that names pytest (the kill's parent) gets it refused, not killed."""
    w = snapshot.read_worker(fake_worker["main"])
    me = read_proc(os.getpid())
    rogue = snapshot.Worker(main=w.main, procs=(w.main, me))
    state = write_state(tmp_path / "state.json", rogue, Policy.parse("none"))
    res = cli("kill", state, "--grace", "5", "--json")
    doc = {p["pid"]: p for p in json.loads(res.stdout)["processes"]}
    assert doc[os.getpid()]["status"] == "refused"
    assert doc[os.getpid()]["reason"] == "an ancestor of this tool"


def test_pid_reuse_is_never_signalled(tmp_path, real_procs):
    """A recorded PID that a new process now holds is refused, not signalled.

    The kernel is made to hand the dead process's PID to a new one through
    /proc/sys/kernel/ns_last_pid (root only).
    """
    victim = real_procs.spawn(["sleep", str(LIFETIME)], process_group=0)
    recorded = snapshot.read_worker(victim.pid)
    state = write_state(tmp_path / "state.json", recorded)
    victim.kill()
    victim.wait(10)
    stranger = real_procs.spawn_on_pid(victim.pid, recorded.main.create_time, LIFETIME)
    res = cli("kill", state, "--grace", "1", "--json")
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(res.stdout)["processes"]
    assert entry["status"] == "refused"
    assert "another process" in entry["reason"]
    assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE
