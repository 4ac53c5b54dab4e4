"""``restart --dry-run``: what a restart (plain or ``--rolling``) would do, with nothing drained, stopped or signalled.

It reads what the real restart reads before it touches anything:
supervisord's process list, the workers' trees and their active tasks
(savepid into a scratch record, removed afterwards), and, for a rolling
restart, the batches and the queues that would have no consumer. Then it
asks the kill, in its own dry run, what it would do with that record: the
verdict of every recorded process, as ``kill --dry-run`` prints it.

The kill's verdicts are taken while the workers still run, so they name
every attached process of the tree, the main and pool processes included;
after a real stop most of those are gone, and the kill finds them "already
gone". The refusals are the real ones: a rolling restart that would leave
no consumer is refused here too (exit 2), and so is a supervisord that
does not say which processes its programs run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import EXIT_OK, UsageError
from ..processes.kill import KillReport
from . import restart as restarting
from .kill import DEFAULT_GRACE, kill
from .rolling_plan import Plan
from .savepid import DEFAULT_TIMEOUT, SaveResult


@dataclass
class RestartPreview:
    """What ``restart`` would do; ``plan`` is set for ``--rolling``."""

    processes: list[str]
    running: dict[str, int]  # process -> PID, the ones running now (the others would only be started)
    nodes: list[str] = field(default_factory=list)  # the workers that would be drained
    save: SaveResult | None = None
    kill: KillReport | None = None
    plan: Plan | None = None
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = True  # for the renderers shared with the kill
    problem: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_OK

    @property
    def tasks(self) -> list[tuple[str, object]]:
        """``(node, task)`` for every task running now: a restart waits for these (the drain) before it stops."""
        return [(w.node, t) for w in self.save.snapshot.workers for t in w.tasks] if self.save else []

    def steps(self) -> list[str]:
        """The restart's phases, in order, as sentences in the conditional."""
        if self.plan is not None:
            out = [f"batch {b.number}/{len(self.plan.batches)}: {', '.join(b.processes)}"
                   + (f" ({', '.join(b.nodes)})" if b.nodes else "")
                   + ": savepid, drain, stop, kill, start, wait for a ping" for b in self.plan.batches]
            return out
        stop = [p for p in self.processes if p in self.running]
        return [
            f"drain {', '.join(self.nodes)}: cancel their queues, wait for their {len(self.tasks)} running task(s)"
            if self.nodes else "drain: no worker running, nothing to drain",
            f"stop {', '.join(stop)}" if stop else "stop: nothing is running",
            "kill what the stop leaves of the recorded trees (the verdicts below)",
            f"start {', '.join(self.processes)} and wait for each worker to answer a ping",
        ]

    def to_document(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "dry_run": True,
            "processes": self.processes,
            "running": self.running,
            "old_nodes": self.nodes,
            "steps": self.steps(),
            "tasks": [{"node": node, "id": t.id, "name": t.name} for node, t in self.tasks],
            "batches": None if self.plan is None else [
                {"number": b.number, "processes": list(b.processes), "nodes": list(b.nodes),
                 "lonely_queues": {q: list(n) for q, n in b.lonely.items()}} for b in self.plan.batches],
            "kill": None if self.kill is None else self.kill.to_document(),
            "warnings": self.warnings,
        }


def preview(
    app,
    app_spec: str | None,
    programs: Iterable[str],
    server,
    *,
    rolling: bool = False,
    max_unavailable: int = 1,
    grace: float = DEFAULT_GRACE,
    timeout: float = DEFAULT_TIMEOUT,
) -> RestartPreview:
    """What ``restart`` (``--rolling`` with *rolling*) would do to *programs*; nothing is touched.

    Raises what the real restart raises before it touches anything: no
    app, an unknown program, an unreachable supervisord, a refused roll.
    """
    from ..supervisord import rpc
    from . import rolling as rolling_verb

    if app is None or not app_spec:
        raise UsageError("restart needs -A APP: the app whose workers it drains and pings")
    if grace < 0:
        raise UsageError("--grace must not be negative")
    infos = rpc.all_process_info(server)
    names = rpc.expand_names(list(programs), infos)
    by_name = {rpc.full_name(i): i for i in infos}
    running = {n: int(by_name[n]["pid"]) for n in names if by_name.get(n, {}).get("pid")}
    result = RestartPreview(processes=names, running=running)
    if rolling:
        result.plan = rolling_verb.read_plan(infos, names, app, app_spec, max_unavailable)
        result.warnings += result.plan.warnings()
    scratch = tempfile.mkdtemp(prefix="celery-supervise-preview-")
    try:
        path = os.path.join(scratch, "state.json")
        result.save = saved = restarting.record_programs(path, app, app_spec, server, names, timeout)
        result.warnings += saved.warnings
        result.nodes = restarting.nodes_of(saved)
        # The kill's own dry run of this record: the verdicts, nothing signalled, nothing audited.
        result.kill = kill(path, grace=grace, dry_run=True, app_spec=app_spec)
        result.warnings += result.kill.warnings
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result
