"""``celery-supervise requeue``: send again, once, the recorded tasks a stop cut off.

The rules are :func:`celery_supervise.celery_side.requeue.decide`; the
broker plumbing (publish as recorded, what the broker redelivers) is on the
Celery side too. This runs them under the ledger's lock and records each
send, so running it again sends nothing twice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..celery_side import control
from ..errors import EXIT_OK, EXIT_PARTIAL, PartialError, StateFileError, UsageError
from ..processes import statefile

if TYPE_CHECKING:
    # Imported where requeue runs: they bring kombu's JSON and transports,
    # which the other verbs (and this module's constants) never need.
    from ..celery_side import requeue as requeuing


def send_again(app, conn, decision: requeuing.Decision) -> None:
    """Publish the recorded task again (see :func:`celery_supervise.celery_side.requeue.send_again`)."""
    from ..celery_side import requeue as requeuing

    requeuing.send_again(app, conn, decision)

RESENT = "re-sent"
WOULD_RESEND = "would re-send"
SKIPPED = "skipped"
FAILED = "failed"
#: The order of the report's summary.
STATUS_ORDER = (RESENT, WOULD_RESEND, FAILED, SKIPPED)

#: Files of the journal last written this long before the earliest recorded
#: task started are not read (a margin for the clocks of two processes).
JOURNAL_SLACK = 60.0


@dataclass
class RequeueOutcome:
    decision: requeuing.Decision
    status: str  # RESENT, WOULD_RESEND, SKIPPED or FAILED
    error: str | None = None

    @property
    def reason(self) -> str:
        return self.decision.reason if self.error is None else f"{self.decision.reason}; {self.error}"


@dataclass
class RequeueResult:
    path: str
    ledger: str
    journal: str | None  # the journal directory read, if any
    dry_run: bool
    outcomes: list[RequeueOutcome]
    warnings: list[str] = field(default_factory=list)

    def by_status(self, status: str) -> list[RequeueOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def partial(self) -> bool:
        return bool(self.by_status(FAILED))

    @property
    def exit_code(self) -> int:
        """0 when done; 3 (partial) when the broker failed after some tasks were re-sent."""
        return EXIT_PARTIAL if self.partial else EXIT_OK

    def summary(self) -> str:
        counts = {s: len(self.by_status(s)) for s in STATUS_ORDER}
        first = f"would re-send {counts[WOULD_RESEND]}" if self.dry_run else f"re-sent {counts[RESENT]}"
        line = f"{first}, skipped {counts[SKIPPED]}"
        if counts[FAILED]:
            line += f", failed {counts[FAILED]}"
        return line + f" of {len(self.outcomes)} recorded task(s)"

    def to_document(self) -> dict:
        def route(r):
            return None if r is None else {"exchange": r.exchange, "routing_key": r.routing_key,
                                           "queue": r.queue, "priority": r.priority}

        return {
            "dry_run": self.dry_run,
            "exit_code": self.exit_code,
            "state_file": self.path,
            "ledger": self.ledger,
            "journal": self.journal,
            "summary": {s: len(self.by_status(s)) for s in STATUS_ORDER},
            "tasks": [
                {"id": o.decision.task.id, "name": o.decision.task.name, "args": o.decision.task.args,
                 "kwargs": o.decision.task.kwargs, "node": o.decision.recorded.node,
                 "worker": o.decision.recorded.worker, "acknowledged": o.decision.task.acknowledged,
                 "status": o.status, "reason": o.reason, "route": route(o.decision.route)}
                for o in self.outcomes
            ],
            "warnings": self.warnings,
        }


def requeue(
    path: str,
    app,
    *,
    journal_dir: str | None = None,
    dry_run: bool = False,
    publish: Callable[[object, object, requeuing.Decision], None] = send_again,
    connect: Callable[[object], object] = control.connect,
) -> RequeueResult:
    """Send again the tasks *path* recorded that were cut off and will not come back by themselves.

    See :mod:`celery_supervise.celery_side.requeue` for the rules. The journal is
    *journal_dir*, else the one the app's configuration names (see
    :mod:`celery_supervise.journal`). Sent task ids go to the ledger beside
    *path* one by one, so running it again sends nothing twice. The broker
    is reached before anything is sent: when it is down, nothing is sent
    and the ledger is untouched.
    """
    from ..celery_side import ledger as ledgers

    if app is None:
        raise UsageError("requeue needs -A APP: the app whose broker the tasks are sent through")
    with ledgers.exclusive(path):
        record = statefile.read_here(path)
        if isinstance(record, statefile.LegacyRecord):
            raise StateFileError(path, "is a bare PID list (the old savepid format): it records no tasks to requeue")
        return _requeue_locked(path, app, record, journal_dir=journal_dir, dry_run=dry_run,
                               publish=publish, connect=connect)


def _requeue_locked(path, app, record, *, journal_dir, dry_run, publish, connect) -> RequeueResult:
    from ..celery_side import journal as journaling, ledger as ledgers, requeue as requeuing

    snap = record.snapshot
    recorded = [requeuing.Recorded(t, w.node, w.main.pid) for w in snap.workers for t in w.tasks]
    warnings: list[str] = []
    if snap.workers and "control" not in snap.source.split("+"):
        warnings.append(f"{path} was recorded without the broker's answer (workers found by {snap.source}): "
                        "it holds no running task, so there is nothing to requeue")
    ledger = ledgers.read(path, host=snap.host, taken_at=snap.taken_at)
    directory = journal_dir or journaling.configured_directory(app)
    entries = None
    if directory:
        starts = [t.task.time_start for t in recorded]
        since = None
        if starts and all(isinstance(s, (int, float)) for s in starts):
            since = min(starts) - JOURNAL_SLACK
        entries = journaling.read(directory, (r.task.id for r in recorded), since)
    keeps_unacked, queued = requeuing.broker_redelivery(app)
    decisions = requeuing.decide(recorded, journal=entries, ledger=ledger.ids,
                                 broker_keeps_unacked=keeps_unacked, queued=queued)
    warnings += _at_least_once_warnings(decisions, directory)

    to_send = [d for d in decisions if d.action == requeuing.RESEND]
    outcomes = {id(d): RequeueOutcome(d, SKIPPED) for d in decisions if d.action != requeuing.RESEND}
    if dry_run:
        for d in to_send:
            outcomes[id(d)] = RequeueOutcome(d, WOULD_RESEND)
    elif to_send:
        conn = connect(app)  # BrokerError when it is down: nothing sent, ledger untouched
        try:
            # Write the ledger once before the first send: a folder that
            # cannot take it (read-only, full) fails here with nothing sent,
            # not after a send it could not record (a rerun would send that
            # one twice).
            ledgers.save(ledger, path)
            failure = None
            for d in to_send:
                if failure is not None:
                    outcomes[id(d)] = RequeueOutcome(d, FAILED, "not sent: the broker failed before")
                    continue
                try:
                    publish(app, conn, d)
                except Exception as exc:  # kombu and the transports raise many kinds
                    failure = " ".join(f"{type(exc).__name__}: {exc}".split())
                    outcomes[id(d)] = RequeueOutcome(d, FAILED, f"not sent: {failure}")
                    continue
                try:
                    ledgers.record_sent(ledger, path, d.task.id, name=d.task.name, route=d.route.describe())
                except StateFileError as exc:
                    raise PartialError(f"task {d.task.id} was re-sent, but the ledger could not record it "
                                       f"({exc}): running requeue again would send it twice") from None
                outcomes[id(d)] = RequeueOutcome(d, RESENT)
            if failure is not None:
                warnings.append(f"the broker failed while re-sending ({failure}); the tasks re-sent before "
                                f"are in {ledger.path}: run requeue again to send the rest")
        finally:
            with contextlib.suppress(Exception):
                conn.release()
    return RequeueResult(path, ledger.path, directory, dry_run, [outcomes[id(d)] for d in decisions], warnings)


def _at_least_once_warnings(decisions, directory) -> list[str]:
    from ..celery_side import requeue as requeuing

    weak = requeuing.at_least_once(decisions)
    if not weak:
        return []
    if directory is None:
        return [f"no task journal: {len(weak)} task(s) are re-sent at least once: a task that finished between "
                "savepid and the stop runs again (install celery_supervise.journal in the app, or pass --journal DIR)"]
    return [f"{len(weak)} task(s) are not in the journal {directory} (was it installed in the worker?): "
            "they are re-sent at least once: one that finished between savepid and the stop runs again"]
