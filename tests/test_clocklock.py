"""The soaks' clock lock (``bench/clocklock.py``), with real processes and real flock; no clock is touched.

Each holder is a child process driven line by line on stdin (``shared``,
``exclusive``, ``step`` = exclusive() from a shared hold, ``release``); it
answers ``ok CMD`` once the call returned, so "still waiting" is "no answer
yet".
"""

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from bench.clocklock import ClockLock
    lock = ClockLock(sys.argv[2])
    step = None
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "shared":
            lock.acquire_shared()
        elif cmd == "exclusive":
            lock.acquire_exclusive()
        elif cmd == "step":  # exclusive() from a shared hold, kept until "unstep"
            step = lock.exclusive()
            step.__enter__()
        elif cmd == "unstep":
            step.__exit__(None, None, None)
        elif cmd == "release":
            lock.release()
        print("ok", cmd, lock.held, flush=True)
""")


class Holder:
    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.answer(10) == "ready"

    def send(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout):
        """The next line, or None if none came within *timeout* seconds (the call is still waiting)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def do(self, cmd, timeout=10):
        self.send(cmd)
        line = self.answer(timeout)
        assert line is not None and line.startswith(f"ok {cmd}"), f"{cmd}: {line!r}"
        return line

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def holders(tmp_path):
    made = []

    def make():
        made.append(Holder(tmp_path / "clock.lock"))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_shared_holders_overlap(holders):
    a, b = holders(), holders()
    a.do("shared")
    b.do("shared", timeout=2)


def test_exclusive_waits_for_the_shared_holder_and_shared_waits_for_exclusive(holders):
    a, b = holders(), holders()
    a.do("shared")
    b.send("exclusive")
    assert b.answer(0.5) is None  # a is mid-cycle
    a.do("release")
    assert b.answer(5).startswith("ok exclusive")
    a.send("shared")
    assert a.answer(0.5) is None  # the clock is being stepped
    b.do("release")
    assert a.answer(5).startswith("ok shared")


def test_writer_preference_a_waiting_step_stops_new_cycles(holders):
    """a mid-cycle, b waits to step: c, who could share with a, must wait until b has stepped."""
    a, b, c = holders(), holders(), holders()
    a.do("shared")
    b.send("exclusive")
    assert b.answer(0.5) is None
    c.send("shared")
    assert c.answer(0.5) is None  # without the turnstile c would get in, and b could starve
    a.do("release")
    assert b.answer(5).startswith("ok exclusive")
    assert c.answer(0.5) is None
    b.do("release")
    assert c.answer(5).startswith("ok shared")


def test_two_streams_stepping_at_once_do_not_deadlock(holders):
    """Both hold shared, both want to step: exclusive() drops the shared hold first, so both get through."""
    a, b = holders(), holders()
    a.do("shared")
    b.do("shared")
    a.send("step")
    b.send("step")
    answers = {h: h.answer(5) for h in (a, b)}  # the one that got the turnstile first steps; the other waits
    stepped = [h for h, line in answers.items() if line is not None]
    assert [answers[h] for h in stepped] == ["ok step exclusive"], answers
    [first] = stepped
    other = b if first is a else a
    first.send("unstep")
    # Either first is back in (shared, its cycle goes on, other waits for its end), or other got the turnstile.
    line = first.answer(2)
    if line is not None:
        assert line == "ok unstep shared"
        assert other.answer(0.5) is None
        first.do("release")
        assert other.answer(5) == "ok step exclusive"
        assert other.do("unstep") == "ok unstep shared"
    else:
        assert other.answer(5) == "ok step exclusive"
        assert other.do("unstep") == "ok unstep shared"
        assert first.answer(5) == "ok unstep shared"


def test_a_holder_that_dies_lets_the_lock_go(holders):
    a, b = holders(), holders()
    a.do("exclusive")
    b.send("shared")
    assert b.answer(0.5) is None
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)
    assert b.answer(5).startswith("ok shared")
