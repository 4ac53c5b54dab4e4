"""Carrying out a plan: re-verify, SIGTERM bottom-up, wait, SIGKILL the rest.

Step three of snapshot -> plan -> act, and the only module that sends
signals. ``--dry-run`` never reaches :func:`signal_proc`.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..errors import EXIT_OK, EXIT_PARTIAL
from . import procs
from .plan import KILL, REFUSE, SPARE, Verdict
from .procs import Proc
from .statefile import proc_to_dict

# Outcomes, one per process, as the report shows them.
KILLED = "killed"
SPARED = "spared"
GONE = "gone"  # exited on its own before we signalled it
REUSED_REASON = "PID now held by another process (creation time differs)"
REFUSED = "refused"  # deliberately not signalled (safety)
FAILED = "failed"  # could not be signalled, or survived SIGKILL
WOULD_KILL = "would kill"  # --dry-run
#: The order of the report's rows and of its summary.
STATUS_ORDER = (KILLED, WOULD_KILL, SPARED, GONE, REFUSED, FAILED)

# Results of one signal attempt.
SENT = "sent"
NO_PROCESS = "no such process"
REUSED = "reused"
DENIED = "access denied"

POLL_INTERVAL = 0.02
KILL_WAIT = 2.0  # after SIGKILL, only the kernel can still delay the exit
#: File descriptors left free for everything else while targets are pinned.
FD_HEADROOM = 64
#: After a burst of exits, wait this long for more before looking again.
COALESCE = 0.002


@dataclass(frozen=True)
class Outcome:
    proc: Proc
    worker_pid: int
    status: str
    reason: str
    signal: str | None = None  # the signal that ended it, for KILLED


@dataclass
class KillReport:
    outcomes: list[Outcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False

    def by_status(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def partial(self) -> bool:
        return any(o.status == FAILED for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """3 (partial) when a process could not be killed."""
        return EXIT_PARTIAL if self.partial else EXIT_OK

    def ordered(self) -> list[Outcome]:
        return sorted(self.outcomes, key=lambda o: (STATUS_ORDER.index(o.status), o.worker_pid, o.proc.pid))

    def counts(self) -> dict[str, int]:
        return {s: len(self.by_status(s)) for s in STATUS_ORDER}

    def summary(self) -> str:
        counts = self.counts()
        first = f"would kill {counts[WOULD_KILL]}" if self.dry_run else f"killed {counts[KILLED]}"
        return (f"{first}, spared {counts[SPARED]}, already gone {counts[GONE]}, "
                f"refused {counts[REFUSED]}, failed {counts[FAILED]}")

    def to_document(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "exit_code": self.exit_code,
            "summary": self.counts(),
            "processes": [
                {
                    **proc_to_dict(o.proc),
                    "worker": o.worker_pid,
                    "status": o.status,
                    "reason": o.reason,
                    "signal": o.signal,
                }
                for o in self.ordered()
            ],
            "warnings": self.warnings,
        }


def signal_proc(proc: Proc, sig: int) -> str:
    """Send *sig* to *proc* if, and only if, it is still the same process.

    The PID is pinned with a pidfd first, then the creation time compared:
    if the PID was reused before ``pidfd_open`` the times differ, and after
    it the pidfd refers to that very process whatever happens to the number,
    so there is no window in which a recycled PID can receive the signal.
    ESRCH counts as "it just exited", as supervisor's own kill does.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return NO_PROCESS
    except OSError as exc:  # pragma: no cover - kernels without pidfd
        if exc.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        fd = None
    try:
        current = procs.live_identity(proc.pid)
        if current is None:
            return NO_PROCESS
        if not proc.same_process(current):
            return REUSED
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:  # pragma: no cover
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            return NO_PROCESS
        except PermissionError:
            return DENIED
        return SENT
    finally:
        if fd is not None:
            os.close(fd)


def _depth(proc: Proc, by_pid: dict[int, Proc]) -> int:
    depth, seen = 0, set()
    parent = by_pid.get(proc.ppid)
    while parent is not None and parent.pid not in seen:
        seen.add(parent.pid)
        depth += 1
        parent = by_pid.get(parent.ppid)
    return depth


def bottom_up(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """Children before parents, so a parent never outlives the signal to reap them."""
    verdicts = list(verdicts)
    by_pid = {v.proc.pid: v.proc for v in verdicts}
    return sorted(verdicts, key=lambda v: _depth(v.proc, by_pid), reverse=True)


def alive(proc: Proc) -> bool:
    return proc.identity.alive()


class Pins:
    """The pidfds of one kill's targets, each pinned and identity-checked once.

    :func:`signal_proc` opens a pidfd, re-reads the creation time, signals
    and closes, for every signal; a 1,000-process kill then spends more
    time on ``/proc`` than on signals, and waits by re-reading every
    survivor's ``stat`` every :data:`POLL_INTERVAL`. Here each target's
    pidfd is opened and its identity checked once, before the kill's first
    signal (:meth:`pin`); the pidfd then names that very process for as
    long as it is open, so every signal through it (the SIGTERM, a SIGKILL
    after the grace) reaches that process or nobody, whatever happens to
    its PID. The same pidfds tell when each process has exited:
    one becomes readable when its process is a zombie or reaped, which is
    what "gone" means everywhere here, so the wait is an ``epoll`` on
    them, woken by the exits themselves instead of a poll.

    Every target is pinned before the first signal is sent: the pinning
    reads ``/proc``, and a kill that interleaves those reads with its
    signals competes for the CPU with the processes it has just signalled,
    which are busy exiting. Pinned first, the signals then go out as fast
    as a bare ``kill`` loop sends them.

    At most *budget* pidfds are held (a kill must not exhaust the file
    descriptor limit); a target beyond it, or on a kernel without pidfds,
    is signalled by :func:`signal_proc` and waited for by :func:`alive`.
    """

    def __init__(self, budget: int | None = None):
        self.budget = _fd_budget() if budget is None else budget
        self.fds: dict[int, int] = {}  # pid -> pidfd, for every pinned process (closed once it exited)
        self.pids: dict[int, int] = {}  # open pidfd -> pid
        self.settled: dict[int, str] = {}  # pid -> NO_PROCESS or REUSED, found when pinning
        self.exited: set[int] = set()
        self.poller = select.epoll()

    def pin(self, procs_: Iterable[Proc]) -> None:
        """Open and check a pidfd for each of *procs_* not pinned yet."""
        for proc in procs_:
            if proc.pid in self.fds or proc.pid in self.settled or len(self.fds) >= self.budget:
                continue
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                self.settled[proc.pid] = NO_PROCESS
                continue
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOSYS, errno.EINVAL):
                    raise
                self.budget = len(self.fds)  # no more pidfds: the rest go through signal_proc
                continue
            # The pidfd is pinned first, then the identity read: a PID reused
            # before pidfd_open shows another creation time here.
            current = procs.live_identity(proc.pid)
            if current is None or not proc.same_process(current):
                os.close(fd)
                self.settled[proc.pid] = NO_PROCESS if current is None else REUSED
                continue
            self.fds[proc.pid] = fd
            self.pids[fd] = proc.pid
            self.poller.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
        self._collect(0)

    def signal(self, proc: Proc, sig: int) -> str:
        """Send *sig* to *proc* through its pidfd (:func:`signal_proc` when not pinned)."""
        if proc.pid in self.settled:
            return self.settled[proc.pid]
        fd = self.fds.get(proc.pid)
        if fd is None:
            return signal_proc(proc, sig)
        if proc.pid in self.exited:
            return NO_PROCESS
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return NO_PROCESS
        except PermissionError:
            return DENIED
        return SENT

    def alive(self, proc: Proc) -> bool:
        if proc.pid in self.fds:
            return proc.pid not in self.exited
        return alive(proc)

    def sleep(self, seconds: float) -> None:
        """Wait *seconds*, or less once every pinned process has exited."""
        if len(self.exited) == len(self.fds):
            time.sleep(seconds)  # only unpinned ones (if any) are left, to be polled
            return
        deadline = time.monotonic() + seconds
        while len(self.exited) < len(self.fds):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._collect(left) and len(self.exited) < len(self.fds):
                # A tree's processes exit in bursts: gather a burst rather
                # than wake (and be scheduled) once per exit.
                time.sleep(min(COALESCE, max(0.0, deadline - time.monotonic())))

    def _collect(self, timeout: float) -> int:
        # One-shot: a reported pidfd is disarmed by the kernel, not
        # unregistered one by one. Its process has exited, so it will never
        # be signalled again (signal() checks `exited` first): closed now,
        # while the rest are still exiting, rather than all at the end.
        ready = self.poller.poll(timeout, max(1, len(self.fds)))
        for fd, _events in ready:
            self.exited.add(self.pids.pop(fd))
            os.close(fd)
        return len(ready)

    def close(self) -> None:
        self.poller.close()
        for fd in self.pids:  # those whose process has not been seen to exit
            os.close(fd)
        self.pids.clear()

    def __enter__(self) -> "Pins":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fd_budget() -> int:
    """How many pidfds a kill may hold: the soft limit, less those open, less a margin."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 256
    return max(0, soft - in_use - FD_HEADROOM)


def execute(
    verdicts: Iterable[Verdict],
    *,
    grace: float,
    dry_run: bool = False,
    signaller: Callable[[Proc, int], str] | None = None,
    is_alive: Callable[[Proc], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] | None = None,
    on_wait: Callable[[int, float, float], None] | None = None,
) -> KillReport:
    """Apply *verdicts*: TERM every ``kill`` bottom-up, wait *grace*, KILL the rest.

    By default the targets are pinned with pidfds (see :class:`Pins`),
    which also say when each one has exited. *signaller*, *is_alive* and
    *sleep* replace those (for tests: :func:`signal_proc`, :func:`alive` and
    ``time.sleep`` are the per-signal equivalents). *on_wait(left,
    elapsed, grace)* is called while waiting, for progress.
    """
    report = KillReport(dry_run=dry_run)
    targets = []
    for v in verdicts:
        if v.action == SPARE:
            report.outcomes.append(Outcome(v.proc, v.worker_pid, SPARED, v.reason))
        elif v.action == REFUSE:
            report.outcomes.append(Outcome(v.proc, v.worker_pid, REFUSED, v.reason))
        elif v.action == KILL:
            targets.append(v)
    if dry_run:
        # Say what the real run would do: it opens a pidfd and re-checks the
        # creation time before each signal, so a PID that is gone or now
        # belongs to another process is never "would kill".
        for v in targets:
            current = procs.live_identity(v.proc.pid)
            if current is None:
                report.outcomes.append(Outcome(v.proc, v.worker_pid, GONE, "already gone"))
            elif not v.proc.same_process(current):
                report.outcomes.append(Outcome(v.proc, v.worker_pid, REFUSED, REUSED_REASON))
            else:
                report.outcomes.append(Outcome(v.proc, v.worker_pid, WOULD_KILL, v.reason))
        return report

    ordered = bottom_up(targets)
    with Pins(budget=0 if signaller is not None else None) as pins:
        pins.pin(v.proc for v in ordered)
        act = _Acts(signaller or pins.signal, is_alive or pins.alive, clock, sleep or pins.sleep)
        _carry_out(ordered, grace, act, report, on_wait)
    return report


@dataclass(frozen=True)
class _Acts:
    signal: Callable[[Proc, int], str]
    alive: Callable[[Proc], bool]
    clock: Callable[[], float]
    sleep: Callable[[float], None]


def _carry_out(targets: list[Verdict], grace: float, act: _Acts, report: KillReport, on_wait) -> None:
    termed = _send_all(targets, signal.SIGTERM, act, report)
    left = _wait(termed, grace, act, on_wait)
    left_pids = {v.proc.pid for v in left}
    for v in termed:
        if v.proc.pid not in left_pids:
            report.outcomes.append(Outcome(v.proc, v.worker_pid, KILLED, v.reason, "SIGTERM"))
    if left:
        killed = _send_all(left, signal.SIGKILL, act, report)
        survivors = {v.proc.pid for v in _wait(killed, KILL_WAIT, act, None)}
        for v in killed:
            if v.proc.pid in survivors:
                report.outcomes.append(Outcome(v.proc, v.worker_pid, FAILED, "survived SIGKILL"))
            else:
                report.outcomes.append(Outcome(v.proc, v.worker_pid, KILLED, v.reason, "SIGKILL"))


def _send_all(targets: list[Verdict], sig: int, act: _Acts, report: KillReport) -> list[Verdict]:
    sent = []
    for v in targets:
        result = act.signal(v.proc, sig)
        if result == SENT:
            sent.append(v)
        elif result == NO_PROCESS:
            # It was alive when the kill began: typically a shell whose child
            # we signalled a moment ago, and which exited with it.
            report.outcomes.append(Outcome(v.proc, v.worker_pid, KILLED, f"{v.reason} (exited during the kill)"))
        elif result == REUSED:
            report.outcomes.append(Outcome(v.proc, v.worker_pid, REFUSED, REUSED_REASON))
        else:
            report.outcomes.append(Outcome(v.proc, v.worker_pid, FAILED, f"{result} ({signal.Signals(sig).name})"))
    return sent


def _wait(targets: list[Verdict], timeout: float, act: _Acts, on_wait) -> list[Verdict]:
    """Wait until every target is gone or *timeout* passes; return the living.

    ``act.sleep`` returns early once every pinned target has exited, so
    the end of the wait is seen when it happens, not at the next poll.
    """
    start = act.clock()
    left = [v for v in targets if act.alive(v.proc)]
    while left:
        elapsed = act.clock() - start
        if elapsed >= timeout:
            break
        if on_wait is not None:
            on_wait(len(left), elapsed, timeout)
        act.sleep(min(POLL_INTERVAL, max(0.0, timeout - elapsed)))
        left = [v for v in left if act.alive(v.proc)]
    return left
