"""Carrying out a plan: re-verify, SIGTERM bottom-up, wait, SIGKILL the rest.

Step three of snapshot -> plan -> act, and the only module that sends
signals. ``--dry-run`` never reaches :func:`signal_proc`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from . import procs
from .plan import KILL, REFUSE, SPARE, Verdict
from .procs import Proc

# Outcomes, one per process, as the report shows them.
KILLED = "killed"
SPARED = "spared"
GONE = "gone"  # exited on its own before we signalled it
REUSED_REASON = "PID now held by another process (creation time differs)"
REFUSED = "refused"  # deliberately not signalled (safety)
FAILED = "failed"  # could not be signalled, or survived SIGKILL
WOULD_KILL = "would kill"  # --dry-run

# Results of one signal attempt.
SENT = "sent"
NO_PROCESS = "no such process"
REUSED = "reused"
DENIED = "access denied"

POLL_INTERVAL = 0.02
KILL_WAIT = 2.0  # after SIGKILL, only the kernel can still delay the exit


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
    current = procs.live_identity(proc.pid)
    return current is not None and proc.same_process(current)


def execute(
    verdicts: Iterable[Verdict],
    *,
    grace: float,
    dry_run: bool = False,
    signaller: Callable[[Proc, int], str] = signal_proc,
    is_alive: Callable[[Proc], bool] = alive,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_wait: Callable[[int, float, float], None] | None = None,
) -> KillReport:
    """Apply *verdicts*: TERM every ``kill`` bottom-up, wait *grace*, KILL the rest.

    *on_wait(left, elapsed, grace)* is called while waiting, for progress.
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

    termed = _send_all(bottom_up(targets), signal.SIGTERM, signaller, report)
    left = _wait(termed, grace, is_alive, clock, sleep, on_wait)
    left_pids = {v.proc.pid for v in left}
    for v in termed:
        if v.proc.pid not in left_pids:
            report.outcomes.append(Outcome(v.proc, v.worker_pid, KILLED, v.reason, "SIGTERM"))
    if left:
        killed = _send_all(left, signal.SIGKILL, signaller, report)
        survivors = {v.proc.pid for v in _wait(killed, KILL_WAIT, is_alive, clock, sleep, None)}
        for v in killed:
            if v.proc.pid in survivors:
                report.outcomes.append(Outcome(v.proc, v.worker_pid, FAILED, "survived SIGKILL"))
            else:
                report.outcomes.append(Outcome(v.proc, v.worker_pid, KILLED, v.reason, "SIGKILL"))
    return report


def _send_all(targets: list[Verdict], sig: int, signaller, report: KillReport) -> list[Verdict]:
    sent = []
    for v in targets:
        result = signaller(v.proc, sig)
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


def _wait(targets: list[Verdict], timeout: float, is_alive, clock, sleep, on_wait) -> list[Verdict]:
    """Poll until every target is gone or *timeout* passes; return the living."""
    start = clock()
    left = [v for v in targets if is_alive(v.proc)]
    while left:
        elapsed = clock() - start
        if elapsed >= timeout:
            break
        if on_wait is not None:
            on_wait(len(left), elapsed, timeout)
        sleep(min(POLL_INTERVAL, max(0.0, timeout - elapsed)))
        left = [v for v in left if is_alive(v.proc)]
    return left
