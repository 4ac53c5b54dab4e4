"""Draining workers: they stop taking tasks, and we wait until they hold none.

Plan on data, then act, as everywhere else:

1. **Targets.** Which nodes, and which queues each one consumes. For this
   host's workers both come from the worker's command line (``-n``, ``-Q``)
   and the app's configuration, without a round trip (:func:`local_targets`).
   A node named with ``--destination`` that does not run here, and every
   worker with ``--all``, consumes queues we cannot read: it gets the app's
   configured queues, then one ``active_queues`` question names the rest.
2. **Cancels.** :func:`cancels` turns the targets into one
   ``cancel_consumer`` per queue, addressed to the nodes that consume it.
3. **Act.** :class:`Drainer` sends every cancel *first*, then polls
   ``reserved`` and ``active`` until every target answers empty
   (:func:`assess`), or the timeout passes.

Why the cancels go first: on the filesystem transport a worker whose pool
is full and that holds a prefetched task reads no control message until a
pool process frees up. Its messages are not dropped: they wait, and are
handled in the order they were sent. A drain that asked questions first
(``stats``, then ``active_queues``) would wait for that, or time out,
while the worker goes on taking tasks. A cancel sent first is the first
thing the worker reads when it looks again.

Nothing here acks, purges or moves a task message: tasks still in the
broker stay there for the next worker. Tasks a worker had already
prefetched (``reserved``) are its own; it runs them, and the drain waits
for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

from .. import options
from ..errors import EXIT_OK, EXIT_PARTIAL, BrokerError
from ..processes.snapshot import Task

ACTIVE = "active"
RESERVED = "reserved"

#: Seconds a drain waits for the workers to hold no task, by default.
DEFAULT_TIMEOUT = options.DRAIN_TIMEOUT
#: Pause between two poll rounds.
POLL_INTERVAL = 0.1
#: Longest wait for one reply. A worker that does not answer in time counts
#: as not drained, and is asked again in the next round.
POLL_WAIT = 1.0
#: How long the ``active_queues`` question may take for named nodes.
ASK_WAIT = 2.0
#: With ``--all``, how long after the last reply to wait for more workers.
ALL_WINDOW = 1.0


# ---------------------------------------------------------------------- data


@dataclass(frozen=True)
class Target:
    """A worker to drain: its node name and, when known here, its queues."""

    node: str
    queues: tuple[str, ...] | None = None  # None: not readable here, ask the worker
    pid: int | None = None  # the local worker's main process


@dataclass(frozen=True)
class Held:
    """A task a worker still holds: running (``active``) or prefetched (``reserved``)."""

    node: str
    state: str
    task: Task

    def runtime(self, now: float) -> float | None:
        """Seconds it has been running at wall-clock *now*; ``None`` if not started."""
        try:
            return max(0.0, now - float(self.task.time_start))
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Assessment:
    """What one poll round says about the targets.

    A node is drained when it answered both questions with an empty list,
    and had already answered an earlier round. The second condition closes
    a race: a worker executes ``cancel_consumer`` on its next loop
    iteration, not while reading it, so in the round that first reaches
    it a task can still slip in. Once it has answered a round, the cancel
    has run.
    """

    held: tuple[Held, ...] = ()
    silent: tuple[str, ...] = ()  # did not answer (or answered with an error)
    unconfirmed: tuple[str, ...] = ()  # empty, but answering for the first time

    @property
    def drained(self) -> bool:
        return not (self.held or self.silent or self.unconfirmed)

    @property
    def busy(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h.node for h in self.held))


@dataclass
class DrainResult:
    targets: tuple[Target, ...]
    cancelled: tuple[tuple[str, tuple[str, ...] | None], ...]  # (queue, nodes or None for every worker)
    drained: bool
    elapsed: float
    timeout: float
    held: tuple[Held, ...] = ()  # still held when it ended (each node's last answer)
    silent: tuple[str, ...] = ()  # targets that did not answer the last round
    finished_at: float = 0.0  # the Drainer's wall clock at the verdict: runtimes are counted to it
    everyone: bool = False  # --all
    warnings: list[str] = field(default_factory=list)

    def queues_of(self, node: str) -> list[str]:
        """The queues a cancel was sent for to *node*."""
        return [q for q, nodes in self.cancelled if nodes is None or node in nodes]

    @property
    def exit_code(self) -> int:
        """0 when drained; 3 (partial) when the timeout passed first."""
        return EXIT_OK if self.drained else EXIT_PARTIAL

    def to_document(self) -> dict:
        busy = {h.node for h in self.held}
        return {
            "drained": self.drained,
            "exit_code": self.exit_code,
            "elapsed": round(self.elapsed, 3),
            "timeout": self.timeout,
            "finished_at": self.finished_at,
            "all": self.everyone,
            "workers": [
                {"node": t.node, "pid": t.pid, "queues": self.queues_of(t.node),
                 "answered": t.node not in self.silent,
                 "drained": t.node not in busy and t.node not in self.silent}
                for t in self.targets
            ],
            "cancelled": [{"queue": q, "nodes": None if nodes is None else list(nodes)} for q, nodes in self.cancelled],
            "tasks": [
                {"node": h.node, "id": h.task.id, "name": h.task.name, "state": h.state,
                 "runtime": seconds(h.runtime(self.finished_at)), "time_start": h.task.time_start,
                 "worker_pid": h.task.worker_pid, "args": h.task.args, "kwargs": h.task.kwargs}
                for h in self.held
            ],
            "not_answering": list(self.silent),
            "warnings": self.warnings,
        }


def seconds(value) -> float | None:
    """A duration as JSON shows it: milliseconds, or ``None`` when unknown."""
    return None if value is None else round(value, 3)


# ---------------------------------------------------------------------- plan


def configured_queues(default_queue: str | None, task_queues) -> tuple[str, ...]:
    """The queues a worker without ``-Q`` consumes, from the app's configuration.

    ``task_default_queue``, plus the names in ``task_queues`` when set (a
    list of kombu ``Queue`` objects, of names, or a dict keyed by name).
    """
    names = [default_queue] if default_queue else []
    if task_queues:
        items = task_queues.keys() if isinstance(task_queues, Mapping) else task_queues
        for q in items:
            name = q if isinstance(q, str) else getattr(q, "name", None)
            if name:
                names.append(name)
    return tuple(dict.fromkeys(names))


def local_targets(workers: Mapping[int, object], configured: tuple[str, ...]) -> list[Target]:
    """Targets for this host's workers, ``{main pid: WorkerCommand}`` as a scan finds them.

    A worker's queues are its ``-Q`` list, else the app's configured ones.
    Two processes that claim one node name are one target with both queue
    lists (Celery itself warns about such duplicates).
    """
    by_node: dict[str, Target] = {}
    for pid, command in sorted(workers.items()):
        queues = tuple(command.queues) or configured
        known = by_node.get(command.node)
        if known is not None:
            queues = tuple(dict.fromkeys((*known.queues, *queues)))
            pid = known.pid
        by_node[command.node] = Target(command.node, queues, pid)
    return list(by_node.values())


def named_targets(names: Iterable[str], local: Iterable[Target]) -> list[Target]:
    """Targets for ``--destination`` names: the local worker's, or one with unknown queues."""
    by_node = {t.node: t for t in local}
    return [by_node.get(name) or Target(name) for name in dict.fromkeys(names)]


def cancels(targets: Iterable[Target], configured: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """One ``(queue, nodes)`` per queue: whom to tell to stop consuming it.

    A target whose queues are unknown gets the configured ones (the
    ``active_queues`` reply adds the rest, see :func:`more_cancels`).
    """
    plan: dict[str, list[str]] = {}
    for t in targets:
        for q in (t.queues if t.queues is not None else configured):
            nodes = plan.setdefault(q, [])
            if t.node not in nodes:
                nodes.append(t.node)
    return [(q, tuple(nodes)) for q, nodes in plan.items()]


def queue_names(reply) -> tuple[str, ...]:
    """Queue names from one worker's ``active_queues`` reply (a list of queue dicts)."""
    if not isinstance(reply, list):
        return ()
    names = (q.get("name") for q in reply if isinstance(q, dict))
    return tuple(dict.fromkeys(n for n in names if isinstance(n, str) and n))


def more_cancels(replies: Mapping[str, object], sent: Iterable[tuple[str, tuple[str, ...] | None]]) -> list[tuple[str, tuple[str, ...]]]:
    """Cancels still to send, given ``active_queues`` *replies* and the cancels *sent*."""
    done = set()
    for queue, nodes in sent:
        done.update((queue, n) for n in (nodes if nodes is not None else ("*",)))
    plan: dict[str, list[str]] = {}
    for node in sorted(replies):
        for q in queue_names(replies[node]):
            if (q, node) not in done and (q, "*") not in done:
                plan.setdefault(q, []).append(node)
    return [(q, tuple(nodes)) for q, nodes in plan.items()]


def assess(nodes: Iterable[str], reserved: Mapping[str, object], active: Mapping[str, object],
           answered_before: Iterable[str] = ()) -> Assessment:
    """Decide, from one round's replies, which *nodes* still hold tasks.

    ``reserved`` is asked first and ``active`` second: a task only ever
    moves from reserved to active, so one that moves between the two
    questions is counted at least once. A node missing from either reply,
    or answering anything but a list, is *silent*: not drained.
    """
    before = set(answered_before)
    held: list[Held] = []
    silent, unconfirmed = [], []
    for node in nodes:
        r, a = reserved.get(node), active.get(node)
        if not isinstance(r, list) or not isinstance(a, list):
            silent.append(node)
            continue
        for state, tasks in ((ACTIVE, a), (RESERVED, r)):
            for t in tasks:
                # Something we cannot read is still something the worker holds.
                reply = t if isinstance(t, dict) else {"id": "?", "name": repr(t)}
                held.append(Held(node, state, Task.from_reply(reply)))
        if not a and not r and node not in before:
            unconfirmed.append(node)
    return Assessment(tuple(held), tuple(silent), tuple(unconfirmed))


# ----------------------------------------------------------------------- act


class Remote(Protocol):
    """The remote control calls a drain makes (:class:`celery_supervise.celery_side.control.Remote`)."""

    def cancel_consumer(self, queue: str, nodes: list[str] | None, valid_for: float) -> None: ...

    def inspect(self, command: str, nodes: list[str] | None, timeout: float) -> dict: ...


ProgressCallback = Callable[[Assessment, float, float], None]


class Drainer:
    """Carries out a drain through a :class:`Remote`.

    The clocks and ``sleep`` are arguments so tests can replay a scripted
    history without a broker; ``on_progress(assessment, elapsed, timeout)``
    is called after every poll round.
    """

    def __init__(self, remote: Remote, *, clock=time.monotonic, wall=time.time, sleep=time.sleep,
                 on_progress: ProgressCallback | None = None):
        self.remote = remote
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.on_progress = on_progress

    def run(self, targets: list[Target] | None, configured: tuple[str, ...], timeout: float) -> DrainResult:
        """Drain *targets* (every worker that answers when ``None``) within *timeout* seconds."""
        start = self.clock()
        deadline = start + timeout
        everyone = targets is None
        warnings: list[str] = []

        # 1. Cancel first: nothing before it may wait on a busy worker.
        if everyone:
            plan: list = [(q, None) for q in configured]
        else:
            plan = cancels(targets, configured)
        sent: list = []
        try:
            for queue, nodes in plan:
                self.remote.cancel_consumer(queue, list(nodes) if nodes is not None else None, timeout)
                sent.append((queue, nodes))

            # 2. Workers whose queues we could not read say what else they consume.
            unknown = None if everyone else [t.node for t in targets if t.queues is None]
            if everyone or unknown:
                wait = ALL_WINDOW if everyone else ASK_WAIT
                replies = self.remote.inspect("active_queues", unknown, self._wait(deadline, wait))
                if everyone:
                    targets = [Target(node, queue_names(replies[node])) for node in sorted(replies)]
                    if not targets:
                        warnings.append(f"no worker answered within {ALL_WINDOW:g}s; the cancel of "
                                        f"{', '.join(configured)} was sent to every worker anyway")
                else:
                    for node in unknown:
                        if node not in replies:
                            warnings.append(f"{node} did not say which queues it consumes; only the app's "
                                            f"queues ({', '.join(configured)}) were cancelled there")
                for queue, nodes in more_cancels(replies, sent):
                    self.remote.cancel_consumer(queue, list(nodes), timeout)
                    sent.append((queue, nodes))

            # 3. Poll until every target holds nothing.
            return self._poll(targets, tuple(sent), start, deadline, timeout, everyone, warnings)
        except BrokerError as exc:
            if not sent:
                raise  # nothing changed
            raise BrokerError(
                f"{exc}; the cancel was already sent, so those workers may no longer consume "
                f"{', '.join(dict.fromkeys(q for q, _ in sent))} (restart them, or `celery control add_consumer`)"
            ) from None

    def _wait(self, deadline: float, longest: float) -> float:
        # Never 0: kombu treats a zero timeout as "do not wait at all".
        return max(0.05, min(longest, deadline - self.clock()))

    def _poll(self, targets, sent, start, deadline, timeout, everyone, warnings) -> DrainResult:
        nodes = [t.node for t in targets]
        answered: dict[str, float] = {}  # node -> when it last answered
        last: dict[str, tuple[Held, ...]] = {}  # node -> what it held then
        while nodes:
            round_start = self.clock()
            # Sequential, never two at once: the calls share one reply queue.
            reserved = self.remote.inspect(RESERVED, nodes, self._wait(deadline, POLL_WAIT))
            asked = [n for n in nodes if n in reserved]
            active = self.remote.inspect(ACTIVE, asked, self._wait(deadline, POLL_WAIT)) if asked else {}
            now = self.clock()
            assessment = assess(nodes, reserved, active, answered)
            for node in nodes:
                if node not in assessment.silent:
                    answered[node] = now
                    last[node] = tuple(h for h in assessment.held if h.node == node)
            elapsed = now - start
            if self.on_progress is not None:
                self.on_progress(assessment, elapsed, timeout)
            if assessment.drained:
                break
            if now >= deadline:
                # The last round may have been cut short by the deadline: a
                # node that answered within POLL_WAIT is judged by its last
                # answer, and only one quiet for longer counts as silent.
                silent = tuple(n for n in assessment.silent if now - answered.get(n, start - POLL_WAIT) > POLL_WAIT)
                held = tuple(h for node in nodes for h in last.get(node, ()))
                if not held and not silent:
                    break  # every last answer was empty: the best we know
                return DrainResult(tuple(targets), sent, False, elapsed, timeout, held, silent,
                                   self.wall(), everyone, warnings)
            # A round starts at most every POLL_INTERVAL; no pause when the
            # only doubt is a first empty answer.
            pause = min(POLL_INTERVAL - (now - round_start), deadline - now)
            if pause > 0 and (assessment.held or assessment.silent):
                self.sleep(pause)
        return DrainResult(tuple(targets), sent, True, self.clock() - start, timeout, (), (),
                           self.wall(), everyone, warnings)
