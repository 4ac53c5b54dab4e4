"""Restarting supervisord programs that run Celery workers, and timing it.

:func:`celery_supervise.operations.restart` runs the phases; this module
holds what they produce and the two pieces with a clock in them, so that
tests can drive them with a fake one:

* :class:`CancelClock` wraps the drain's remote control and notes when the
  last ``cancel_consumer`` went out: from then on the old workers take no
  task.
* :func:`wait_answering` pings the new workers until each has answered:
  from then on they consume again.

The time between the two is the **consume gap**: how long the restarted
workers' queues had nobody taking new tasks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from . import options
from .errors import EXIT_OK, EXIT_PARTIAL

SAVEPID = "savepid"
DRAIN = "drain"
STOP = "stop"
KILL = "kill"
START = "start"
READY = "ready"
PHASES = (SAVEPID, DRAIN, STOP, KILL, START, READY)

#: Seconds one ping waits for replies; a worker still starting is asked again.
PING_WAIT = 0.25
#: Pause between two pings that went unanswered (a broker that drops a ping
#: to a node that is not listening yet answers at once, with nothing).
PING_INTERVAL = 0.05
#: How long the new workers may take to answer a ping, by default.
DEFAULT_START_TIMEOUT = options.START_TIMEOUT


@dataclass
class Phase:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class RestartResult:
    """What a restart did, phase by phase; ``problem`` says why it stopped short."""

    processes: list[str]
    phases: list[Phase] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # the old workers' nodes (drained)
    new_nodes: dict[str, float | None] = field(default_factory=dict)  # node -> seconds from start to first answer
    consume_gaps: dict[str, float] = field(default_factory=dict)  # node -> cancel sent .. first answer
    save: object = None  # operations.SaveResult
    drain: object = None  # drain.DrainResult
    kill: object = None  # kill.KillReport
    stopped: bool = False
    started: bool = False
    state_file: str | None = None  # kept: --state, or a record of a stop that went wrong
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def consume_gap(self) -> float | None:
        """The longest gap of any restarted worker; ``None`` if none was drained and answered."""
        return max(self.consume_gaps.values()) if self.consume_gaps else None

    @property
    def total(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.problem else EXIT_OK


class CancelClock:
    """A drain ``remote_factory`` that notes when the last cancel was sent.

    Passes every call through to the real remote (*factory(app)*).
    """

    def __init__(self, factory: Callable, clock: Callable[[], float] = time.monotonic):
        self.factory = factory
        self.clock = clock
        self.remote = None
        self.sent_at: float | None = None

    def __call__(self, app) -> "CancelClock":
        self.remote = self.factory(app)
        return self

    def cancel_consumer(self, queue, nodes, valid_for) -> None:
        self.remote.cancel_consumer(queue, nodes, valid_for)
        self.sent_at = self.clock()

    def inspect(self, command, nodes, timeout) -> dict:
        return self.remote.inspect(command, nodes, timeout)

    def __enter__(self) -> "CancelClock":
        return self

    def __exit__(self, *exc) -> None:
        self.remote.close()


def wait_answering(
    ping: Callable[[list[str], float], set],
    nodes: Callable[[], Iterable[str]],
    deadline: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, float], list[str]]:
    """Ping until every node has answered once, or *deadline* passes.

    *nodes* is called each round, since a new worker's node name is known
    only once its process has exec'd Celery. Returns ``{node: time of its
    first answer}`` and the nodes that never answered.
    """
    answered: dict[str, float] = {}
    wanted: list[str] = []
    while True:
        wanted = list(dict.fromkeys(nodes()))
        pending = [n for n in wanted if n not in answered]
        now = clock()
        if wanted and not pending:
            return answered, []
        if now >= deadline:
            return answered, pending or ["(no worker process found)"]
        if pending:
            replied = ping(pending, max(0.05, min(PING_WAIT, deadline - now)))
            at = clock()
            for node in pending:
                if node in replied:
                    answered[node] = at
            if replied:
                continue
        sleep(min(PING_INTERVAL, max(0.0, deadline - clock())))
