"""Requeue: which recorded tasks to send again, decided on plain data.

savepid records the tasks each worker was running. After the stop,
:func:`decide` tells, for each of them, whether it must be sent again:

=====================================================  ========  ==========================================
what we know about the task                            verdict   reason
=====================================================  ========  ==========================================
its id is in the ledger (sent by an earlier requeue)   skip      ``already requeued``
no name, or its arguments were not recorded as data    skip      ``cannot be re-sent: …``
the journal's last word is ``finished``                skip      ``finished (journal: STATE)``
not acknowledged, the broker keeps unacked messages    skip      ``redelivered by broker (acks_late)``
not acknowledged, its message is back in the queue     skip      ``back in its queue (acks_late)``
not acknowledged, its message died with the worker     resend    ``unacknowledged, but the transport lost it``
the journal's last word is ``started``                 resend    ``interrupted (journal: never finished)``
the journal's last word is ``interrupted``             resend    ``interrupted (journal: terminated)``
a journal, but no line about the task                  resend    ``not in the journal (at-least-once)``
no journal                                             resend    ``no journal (at-least-once)``
=====================================================  ========  ==========================================

The first matching row wins. "Not acknowledged" is savepid's record of
``acknowledged: false``: an ``acks_late`` task (or one Celery had not yet
acked) whose message the broker still holds. RabbitMQ gives it back when
the worker's connection closes, Redis when its ``visibility_timeout``
passes or the worker shuts down cleanly; the filesystem transport keeps an
unacked message only in the worker's memory, so it is back in the queue
folder after a clean (warm or cold) shutdown and lost after a SIGKILL,
which :func:`celery_supervise.fs_transport.queued_task_ids` tells apart.

The two ``at-least-once`` rows are the weak spot this module is honest
about: without the journal's ``finished`` line, a task that finished
between savepid and the stop looks exactly like one that was cut off, and
is sent again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AbstractSet, Iterable, Mapping

from kombu.utils.json import loads as json_loads

from .journal import INTERRUPTED as JOURNAL_INTERRUPTED, Entry
from ..processes.snapshot import Task

RESEND = "resend"
SKIP = "skip"

ALREADY_REQUEUED = "already requeued"
REDELIVERED = "redelivered by broker (acks_late)"
BACK_IN_QUEUE = "back in its queue (acks_late)"
LOST_UNACKED = "unacknowledged, but the transport lost it with the worker"
INTERRUPTED = "interrupted (journal: never finished)"
TERMINATED = "interrupted (journal: terminated)"
NOT_IN_JOURNAL = "not in the journal (at-least-once)"
NO_JOURNAL = "no journal (at-least-once)"
DUPLICATE = "recorded twice; decided once"

#: The reasons that mean "sent again without proof that it did not finish".
AT_LEAST_ONCE = (NOT_IN_JOURNAL, NO_JOURNAL)


@dataclass(frozen=True)
class Recorded:
    """A task savepid recorded as running, with the worker that ran it."""

    task: Task
    node: str | None = None
    worker: int | None = None  # the worker's main PID


@dataclass(frozen=True)
class Route:
    """Where a task is sent again: as it was delivered the first time."""

    exchange: str | None
    routing_key: str | None
    queue: str | None
    priority: int | None = None

    def describe(self) -> str:
        if self.queue:
            return self.queue
        if not self.exchange and self.routing_key:
            return self.routing_key  # the default exchange routes by queue name
        return f"{self.exchange or '(default)'} / {self.routing_key or '-'}"


@dataclass(frozen=True)
class Decision:
    recorded: Recorded
    action: str  # RESEND or SKIP
    reason: str
    route: Route | None = None  # for RESEND

    @property
    def task(self) -> Task:
        return self.recorded.task


def route_of(task: Task) -> Route:
    """The route of *task* from its recorded ``delivery_info``.

    Celery records the exchange and routing key it was delivered with
    (``queue`` too, when a transport gives it). Through the default
    exchange (``""``) the routing key is the queue's name.
    """
    info = task.delivery_info if isinstance(task.delivery_info, Mapping) else {}

    def text(key):
        value = info.get(key)
        return value if isinstance(value, str) and value else None

    priority = info.get("priority")
    queue = text("queue")
    exchange, routing_key = text("exchange"), text("routing_key")
    if queue is None and exchange is None and routing_key:
        queue = routing_key
    return Route(exchange, routing_key, queue, priority if isinstance(priority, int) else None)


def arguments(task: Task) -> tuple[list, dict]:
    """*task*'s ``args`` and ``kwargs`` as Celery first decoded them.

    The state file keeps them as kombu's JSON writes them (a ``datetime``
    is ``{"__type__": "datetime", ...}``); this decodes those markers.
    ``ValueError`` when they were not recorded as data: not a list and a
    mapping, or holding a value only its repr was kept of.
    """
    if not isinstance(task.args, (list, tuple)) or not isinstance(task.kwargs, Mapping):
        raise ValueError("its arguments were not recorded as data")
    try:
        return json_loads(json.dumps(list(task.args))), json_loads(json.dumps(dict(task.kwargs)))
    except (TypeError, ValueError):
        raise ValueError("its arguments were not recorded as data (only their repr)") from None


def unsendable(task: Task) -> str | None:
    """Why *task* cannot be sent again as it was, or ``None``."""
    if not task.id or task.id in ("None", "?"):
        return "cannot be re-sent: no task id recorded"
    if not task.name or task.name == "?":
        return "cannot be re-sent: no task name recorded"
    try:
        arguments(task)
    except ValueError as exc:
        return f"cannot be re-sent: {exc}"
    route = route_of(task)
    if not (route.queue or route.exchange):
        return "cannot be re-sent: no exchange, routing key or queue recorded"
    return None


def decide(
    recorded: Iterable[Recorded],
    *,
    journal: Mapping[str, Entry] | None,
    ledger: AbstractSet[str] = frozenset(),
    broker_keeps_unacked: bool = True,
    queued: AbstractSet[str] | None = None,
) -> list[Decision]:
    """Decide, per recorded task, whether to send it again, and why.

    *journal* maps task ids to their latest journal entry, or is ``None``
    when there is no journal at all. *ledger* holds the ids an earlier
    requeue already sent. *broker_keeps_unacked* says whether the broker
    itself keeps a message its consumer did not acknowledge (RabbitMQ,
    Redis) rather than the consumer's memory (the filesystem transport);
    in the latter case *queued* holds the task ids whose messages are in
    the queues now (``None``: unknown, assume they are).
    """
    decisions: list[Decision] = []
    seen: set[str] = set()
    for rec in recorded:
        t = rec.task
        if t.id in seen:
            decisions.append(Decision(rec, SKIP, DUPLICATE))
            continue
        seen.add(t.id)
        decisions.append(_decide_one(rec, journal, ledger, broker_keeps_unacked, queued))
    return decisions


def _decide_one(rec, journal, ledger, broker_keeps_unacked, queued) -> Decision:
    t = rec.task
    if t.id in ledger:
        return Decision(rec, SKIP, ALREADY_REQUEUED)
    problem = unsendable(t)
    if problem:
        return Decision(rec, SKIP, problem)
    entry = journal.get(t.id) if journal is not None else None
    if entry is not None and entry.finished:
        return Decision(rec, SKIP, f"finished (journal: {entry.state or 'unknown state'})")
    route = route_of(t)
    if t.acknowledged is False:
        if broker_keeps_unacked:
            return Decision(rec, SKIP, REDELIVERED)
        if queued is None or t.id in queued:
            return Decision(rec, SKIP, BACK_IN_QUEUE)
        return Decision(rec, RESEND, LOST_UNACKED, route)
    if entry is not None:
        return Decision(rec, RESEND, TERMINATED if entry.event == JOURNAL_INTERRUPTED else INTERRUPTED, route)
    return Decision(rec, RESEND, NO_JOURNAL if journal is None else NOT_IN_JOURNAL, route)


def at_least_once(decisions: Iterable[Decision]) -> list[Decision]:
    """The decisions to resend made without the journal's word."""
    return [d for d in decisions if d.action == RESEND and d.reason in AT_LEAST_ONCE]


# ------------------------------------------------------- the broker's side


class _AsRecorded:
    """A Celery router that leaves the route alone: the recorded one is the route."""

    def route(self, options, name, args=(), kwargs=None, task_type=None):
        return options


def send_again(app, conn, decision: Decision) -> None:
    """Publish the recorded task again: same id, name, arguments and route, no retries."""
    task, route = decision.task, decision.route
    args, kwargs = arguments(task)
    # Through Celery's own send_task, so that the app's serializer, signals
    # (before_task_publish…) and result backend see an ordinary send. An
    # explicit queue is declared first, as Celery does, so a queue that is
    # gone is created again rather than the message dropped.
    app.send_task(
        task.name, args=args, kwargs=kwargs, task_id=task.id, connection=conn, router=_AsRecorded(),
        queue=route.queue, exchange=route.exchange, routing_key=route.routing_key, priority=route.priority,
        retry=False, add_to_parent=False,
    )


def broker_redelivery(app) -> tuple[bool, frozenset[str] | None]:
    """Whether the app's broker keeps unacknowledged messages, and if not, the ids queued now.

    RabbitMQ, Redis, SQS keep them on the broker. kombu's filesystem and
    memory transports keep them in the consumer's memory: they are back in
    the queue only if the worker shut down cleanly, which the filesystem
    transport's folder shows.
    """
    conn = app.connection_for_write()  # not connected yet: only its transport is looked at
    try:
        driver = conn.transport.driver_type
        if driver not in ("filesystem", "memory"):
            return True, None
        folder = (conn.transport_options or {}).get("data_folder_in")
        if driver == "filesystem" and folder:
            from . import fs_transport

            return False, frozenset(fs_transport.queued_task_ids(folder))
        return False, None
    finally:
        conn.release()


__all__ = ["Recorded", "Route", "Decision", "decide", "route_of", "unsendable", "arguments", "RESEND", "SKIP", "at_least_once",
           "send_again", "broker_redelivery"]
