"""``restart --rolling``'s plan, on data alone: which processes go in which batch, and which queues have a gap.

Pure: supervisord's process list and this host's workers come in as
plain data (:func:`celery_supervise.commands.rolling.read_plan` reads
them), so the cuts, the refusals and the lonely queues are table-tested
without a supervisord or a broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..errors import UsageError

#: The default ``--max-unavailable``.
DEFAULT_MAX_UNAVAILABLE = 1

HOW_TO_ADD_A_PROCESS = ("a zero-gap restart needs a second worker process to consume while the first is "
                        "replaced: run the program with numprocs=2 or more (`celery-supervise print-config "
                        "--numprocs 2`), or use a plain `restart` and accept the gap")


class RollRefused(UsageError):
    """The roll cannot keep a consumer on the queues; nothing was touched (exit 2)."""


# ---------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Batch:
    """Processes replaced together, and the queues that have a gap while they are."""

    number: int  # 1-based
    processes: tuple[str, ...]
    nodes: tuple[str, ...]  # their workers' node names, where known (running processes)
    lonely: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # queue -> batch nodes consuming it


@dataclass(frozen=True)
class Plan:
    processes: tuple[str, ...]
    batches: tuple[Batch, ...]
    queues: Mapping[str, tuple[str, ...]]  # node -> queues, every local worker of the app

    def warnings(self) -> list[str]:
        """One line per batch that leaves a queue with no consumer while it is replaced."""
        out = []
        for b in self.batches:
            for queue, nodes in b.lonely.items():
                out.append(f"queue {queue} is consumed only by {', '.join(nodes)} (batch {b.number}/"
                           f"{len(self.batches)}): it has no consumer while that batch is replaced")
        return out


def batches_of(processes: list[str], max_unavailable: int) -> list[tuple[str, ...]]:
    """*processes* in order, cut into batches of *max_unavailable*; refused when that leaves no consumer."""
    if max_unavailable < 1:
        raise UsageError("--max-unavailable must be 1 or more")
    if len(processes) < 2:
        raise RollRefused(f"restart --rolling: {', '.join(processes) or 'no process'} is a single process; "
                          + HOW_TO_ADD_A_PROCESS)
    if max_unavailable >= len(processes):
        raise RollRefused(f"restart --rolling: --max-unavailable {max_unavailable} would replace all "
                          f"{len(processes)} processes at once, leaving no consumer; use at most "
                          f"{len(processes) - 1}, or a plain `restart`")
    return [tuple(processes[i:i + max_unavailable]) for i in range(0, len(processes), max_unavailable)]


def lonely_queues(batch_nodes: Iterable[str], queues: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    """The queues of *batch_nodes* no other node in *queues* (``{node: queues}``) consumes.

    ``{queue: the batch nodes consuming it}``, in the order first seen.
    """
    batch = list(dict.fromkeys(batch_nodes))
    elsewhere = {q for node, qs in queues.items() if node not in batch for q in qs}
    out: dict[str, list[str]] = {}
    for node in batch:
        for q in queues.get(node, ()):
            if q not in elsewhere:
                out.setdefault(q, []).append(node)
    return {q: tuple(nodes) for q, nodes in out.items()}


def plan(processes: list[str], node_of: Mapping[str, str], queues: Mapping[str, Iterable[str]],
         max_unavailable: int) -> Plan:
    """Batches of *processes* with their nodes (*node_of*: process -> node) and lonely queues."""
    queues = {node: tuple(qs) for node, qs in queues.items()}
    out = []
    for i, names in enumerate(batches_of(processes, max_unavailable), 1):
        nodes = tuple(dict.fromkeys(node_of[n] for n in names if n in node_of))
        out.append(Batch(i, names, nodes, lonely_queues(nodes, queues)))
    return Plan(tuple(processes), tuple(out), queues)


# ------------------------------------------------------------------- results
