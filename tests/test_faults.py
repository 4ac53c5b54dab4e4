"""Faults, with real processes and no broker or supervisord (fast).

Each test makes one thing go wrong for real (the clock is set, the tool is
SIGKILLed mid-kill, a process ignores SIGTERM or is a zombie, a PID is
recycled, the state folder is read-only or full) and checks what the
README's "Faults and what happens" says: the exit code, one line on stderr,
what was and was not signalled, and that a rerun finishes the job.

The faults that need a broker or supervisord are in test_e2e_faults.py.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from celery_supervise import plan, snapshot, statefile
from celery_supervise.plan import Policy

from realprocs import wait_for
from test_kill import LIFETIME, alive, cli, fake_worker, pids, write_state  # noqa: F401  (fixture)

PRIMED = os.path.join(os.path.dirname(__file__), "programs", "primed.py")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (clock, mounts, ns_last_pid)")


# ----------------------------------------------------------------- the clock


@contextlib.contextmanager
def clock_set_by(seconds):
    """Set the realtime clock *seconds* ahead (or back); always set it right again.

    Right again means where it would be had it never been touched: the time
    it showed before, plus what CLOCK_MONOTONIC (which setting the realtime
    clock does not move) says has passed since. Other test runs share this
    clock, so callers keep the ``with`` body to the one action under test.
    """
    mono = time.clock_gettime(time.CLOCK_MONOTONIC)
    real = time.clock_gettime(time.CLOCK_REALTIME)
    time.clock_settime(time.CLOCK_REALTIME, real + seconds)
    try:
        yield
    finally:
        time.clock_settime(time.CLOCK_REALTIME, real + (time.clock_gettime(time.CLOCK_MONOTONIC) - mono))


@pytest.fixture
def clock_jump():
    """``clock_jump(seconds)``: a context manager that sets the clock for its body only."""
    return clock_set_by


class Primed:
    """``primed.py``: a celery-supervise action, imported and waiting for go."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, PRIMED, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the handshake: blocks until imported
        if line != "ready\n":
            out, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"primed.py {args} did not get ready ({line!r}): {err}")

    def go(self, timeout=30) -> subprocess.CompletedProcess:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        out, err = self.proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


@pytest.mark.clockjump
@needs_root
@pytest.mark.parametrize("seconds", [30, -30], ids=["ahead", "back"])
def test_kill_after_the_clock_was_set(fake_worker, tmp_path, clock_jump, seconds):
    """savepid, the clock is set, kill: every identity still matches, the tree dies, detached ones live.

    /proc/stat's btime is the realtime clock minus the uptime, so setting
    the clock moves every creation time computed from it. Before the state
    file carried the boot id, the kill refused the whole record as "written
    before the last boot" and the tree leaked.
    """
    state = write_state(tmp_path / "state.json", snapshot.read_worker(fake_worker["main"]))
    kill = Primed("cli", "kill", state, "--grace", "5", "--json")
    before = psutil.boot_time()
    with clock_jump(seconds):
        moved = psutil.boot_time() - before
        res = kill.go()
    assert abs(moved - seconds) <= 1, "setting the clock did not move btime; the test proves nothing"
    assert res.returncode == 0, res.stderr
    statuses = {}
    for p in json.loads(res.stdout)["processes"]:
        statuses.setdefault(p["status"], set()).add(p["pid"])
    attached = {fake_worker["main"]} | pids(fake_worker, "pool", "plain", "parent", "grandchild")
    assert statuses == {"killed": attached, "spared": pids(fake_worker, "nohup", "setsid")}
    assert not any(alive(p) for p in attached)
    assert all(alive(p) for p in pids(fake_worker, "nohup", "setsid"))


@pytest.mark.clockjump
@needs_root
def test_listener_started_after_the_clock_was_set_keeps_its_supervisords_workers(real_procs, tmp_path, clock_jump):
    """A listener record's supervisord identity is rebased too.

    A listener (re)started after the clock was set reads the records the
    previous one wrote. Compared raw, the recorded supervisord no longer
    matches the live one, the worker looks orphaned, and the sweep would
    warm-stop a healthy worker of a live supervisord.
    """
    sup = real_procs.spawn(["sleep", str(LIFETIME)])  # stands in for supervisord: only its identity is read
    main = real_procs.spawn(["sleep", str(LIFETIME)], process_group=0)
    worker = snapshot.read_worker(main.pid, program="w", supervisor_pid=sup.pid)
    doc = statefile.to_document(snapshot.take([worker], "listener"), Policy(), plan.plan([worker], Policy()))
    doc["supervisor"] = {"pid": sup.pid, "create_time": sup.create_time()}
    state_dir = tmp_path / "records"
    state_dir.mkdir(mode=0o700)
    statefile.write(str(state_dir / f"w@{main.pid}.json"), doc)
    sweep = Primed("sweep", str(state_dir), str(sup.pid))
    with clock_jump(45):
        res = sweep.go()
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", "the sweep logged an action: " + res.stderr
    assert main.is_running() and main.status() != psutil.STATUS_ZOMBIE
    assert os.path.exists(state_dir / f"w@{main.pid}.json")
