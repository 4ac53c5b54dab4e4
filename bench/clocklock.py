"""The soaks' clock lock: no soak is mid-cycle while another one steps the machine's clock.

The chaos soak's ``clock-stepped`` fault sets the realtime clock ±30 s for
well under a second. That is harmless to its own cycle, which is built for
it, but not to a soak running beside it: a supervisord mid-stop times
``stopwaitsecs`` with the wall clock, and one step made another soak's
supervisord SIGKILL its worker (docs/faults.md). So every soak (plain or
chaos, one stream or many) holds this lock *shared* for each cycle, and the
step is made holding it *exclusive*: while it is exclusive, every other
soak is between two cycles (its worker idle and RUNNING, nothing timed by
the wall clock).

Two ``flock`` files (``PATH`` and ``PATH.turnstile``), because flock has no
writer preference of its own: with overlapping cycles in K streams, the
shared lock would be held by someone at every instant and the exclusive
waiter starved. The turnstile (Downey, *The Little Book of Semaphores*,
"no-starve readers-writers") fixes that:

* shared: take the turnstile, take ``PATH`` shared, let the turnstile go;
* exclusive: take the turnstile and keep it; take ``PATH`` exclusive;
  release ``PATH`` first, then the turnstile.

Why this cannot deadlock or starve:

* a shared taker holds the turnstile only while it takes ``PATH`` shared,
  and that never blocks: whoever holds ``PATH`` exclusive holds the turnstile
  too, and the turnstile is ours at that moment;
* an exclusive waiter holding the turnstile waits only for the shared
  holders already in, which finish their cycle and release without
  needing anything; no new shared holder gets past the turnstile;
* a stream never waits for the exclusive lock while holding its shared
  one (:meth:`ClockLock.exclusive` drops it first), else two streams
  wanting the step at once would each wait for the other's shared hold;
* flock locks belong to the open file, and the files are opened
  non-inheritable (Python's default): a stream that dies (even SIGKILLed)
  lets its locks go, and no child of it can keep them.

flock wakes its waiters in no set order; a turnstile held for microseconds
by each taker is not a starvation risk at a few streams.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

#: Every soak on this machine agrees on this path unless told otherwise (``--clock-lock``).
DEFAULT_PATH = Path("/tmp/celery-supervise-soak-clock.lock")


class ClockLock:
    """Shared for a cycle, exclusive for a clock step; see the module's docstring for the races."""

    def __init__(self, path: Path | str = DEFAULT_PATH):
        self.path = Path(path)
        self.turnstile_path = self.path.with_name(self.path.name + ".turnstile")
        self._fd: int | None = None
        self._turnstile: int | None = None
        self.held: str | None = None  # None, "shared" or "exclusive"
        #: How long the last acquire_exclusive() waited (the other soaks' cycles under way), in seconds.
        self.waited = 0.0

    def _open(self, path: Path) -> int:
        # 0o666: soaks of other users on this machine must be able to take it too.
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def _fds(self) -> tuple[int, int]:
        if self._fd is None:
            self._fd = self._open(self.path)
            self._turnstile = self._open(self.turnstile_path)
        return self._fd, self._turnstile

    def acquire_shared(self) -> None:
        if self.held is not None:
            raise RuntimeError(f"clock lock {self.path} already held {self.held}")
        fd, turnstile = self._fds()
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # waits while a step is waiting or under way
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # never blocks: an exclusive holder would hold the turnstile
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        self.held = "shared"

    def acquire_exclusive(self) -> None:
        if self.held is not None:  # waiting for exclusive while shared would deadlock two steppers
            raise RuntimeError(f"clock lock {self.path} already held {self.held}")
        fd, turnstile = self._fds()
        began = time.monotonic()
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # from now on no new cycle starts anywhere
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the cycles under way end
        except BaseException:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            raise
        self.waited = time.monotonic() - began
        self.held = "exclusive"

    def release(self) -> None:
        if self.held is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        if self.held == "exclusive":  # after PATH: a shared taker past the turnstile must never block
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        self.held = None

    @contextmanager
    def shared(self):
        """Held for one soak cycle."""
        self.acquire_shared()
        try:
            yield self
        finally:
            self.release()

    @contextmanager
    def exclusive(self):
        """Held around a clock step; a shared hold of ours is dropped first and taken again after.

        Between dropping it and getting the exclusive lock another stream may
        step the clock: the caller takes it only at a point of its cycle where
        it has nothing timed by the wall clock (``clock-stepped``: its
        supervisord is SIGKILLed, the kill not yet started).
        """
        was = self.held
        self.release()
        self.acquire_exclusive()
        try:
            yield self
        finally:
            self.release()
            if was == "shared":
                self.acquire_shared()

    def close(self) -> None:
        self.release()
        for fd in (self._fd, self._turnstile):
            if fd is not None:
                os.close(fd)
        self._fd = self._turnstile = None

