"""``restart PROGRAM… --rolling``: replace the workers a batch at a time, so a queue never lacks a consumer.

A plain ``restart`` drains every worker first, and supervisord cannot start
a process before the old one in its slot has exited: from the first cancel
to the new workers' first ping nobody takes a task, and a long task makes
that gap as long as itself. A rolling restart replaces at most N processes
at once (``--max-unavailable``, default 1); the others go on consuming.

Plan on data, then act:

1. **Plan** (:func:`plan`, pure). The processes the names mean, in
   supervisord's order, cut into batches of N; each process's node and
   queues, read from this host's workers; for each batch, the queues only
   it consumes (:func:`lonely_queues`), which have a gap whatever we do.
   Refused (exit 2, nothing touched): a single process, since a zero gap
   needs a second one, and N at least the number of processes, since then
   a batch is everything and the roll is a plain restart.
2. **Act** (:func:`roll`), batch by batch, the next one only once the
   previous one's new workers answer a ping: savepid (the batch's trees and
   active tasks), drain (those workers only), stop, kill their attached
   leftovers (the detached spared), start, ping. Each phase is the function
   the plain restart uses (:mod:`celery_supervise.commands.restart`).

When a batch goes wrong the roll stops (exit 3):

* a drain that times out stops nothing of that batch: its workers get
  their queues back (``add_consumer``, the queues the drain cancelled), so
  none is left running but consuming nothing, and the busy one finishes its
  task; the batches before stay replaced.
* a new worker that does not answer a ping stops the roll before another
  old worker is touched.

supervisord unreachable: an error (exit 1) before anything is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..celery_side import control, discovery, drain as draining
from ..processes.audit import AuditLog
from ..supervisord import rpc
from . import restart as restarting
from .drain import DEFAULT_DRAIN_TIMEOUT, drain
from .kill import DEFAULT_GRACE, kill
from .savepid import DEFAULT_TIMEOUT
from ..errors import EXIT_OK, EXIT_PARTIAL, PartialError, StateFileError, SuperviseError, UsageError
from .rolling_plan import (  # noqa: F401  (re-exported: rolling.plan etc. are the verb's API)
    DEFAULT_MAX_UNAVAILABLE, HOW_TO_ADD_A_PROCESS, Batch, Plan, RollRefused, batches_of, lonely_queues, plan,
)


@dataclass
class BatchResult:
    number: int
    processes: tuple[str, ...]
    nodes: list[str] = field(default_factory=list)  # the old workers' nodes
    phases: list[restarting.Phase] = field(default_factory=list)
    new_nodes: dict[str, float | None] = field(default_factory=dict)  # node -> start .. first answer
    gap: float | None = None  # this batch's cancels sent .. its new workers all answer
    drain: draining.DrainResult | None = None
    kill: object = None  # kill.KillReport
    resumed: dict[str, list[str]] = field(default_factory=dict)  # node -> queues given back after a drain timeout
    state_file: str | None = None
    problem: str | None = None

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def to_document(self) -> dict:
        return {
            "batch": self.number,
            "processes": list(self.processes),
            "old_nodes": self.nodes,
            "phases": [{"name": p.name, "seconds": round(p.seconds, 3), "detail": p.detail} for p in self.phases],
            "seconds": round(self.seconds, 3),
            "new_nodes": {n: None if s is None else round(s, 3) for n, s in self.new_nodes.items()},
            "gap": None if self.gap is None else round(self.gap, 3),
            "kill": None if self.kill is None else restarting._kill_summary(self.kill),
            "audit": None if self.kill is None else self.kill.audit,
            "resumed": self.resumed,
            "state_file": self.state_file,
            "problem": self.problem,
        }


@dataclass
class RollingResult:
    """What a rolling restart did, batch by batch; ``problem`` says why it stopped short."""

    plan: Plan
    max_unavailable: int
    batches: list[BatchResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.problem else EXIT_OK

    @property
    def seconds(self) -> float:
        return sum(b.seconds for b in self.batches)

    def queue_gaps(self) -> dict[str, dict]:
        """Every queue of the named workers: whether a consumer outside each batch always had it, and its longest gap.

        A covered queue's gap is 0 by construction (someone else consumed
        it all along); a lonely one's is its batch's cancels sent -> new
        workers answering, the longest over the batches that ran.
        """
        named = {n for b in self.plan.batches for n in b.nodes}
        out: dict[str, dict] = {}
        for node in named:
            for q in self.plan.queues.get(node, ()):
                out.setdefault(q, {"covered": True, "gap": 0.0})
        for planned in self.plan.batches:
            done = next((b for b in self.batches if b.number == planned.number), None)
            for q in planned.lonely:
                entry = out.setdefault(q, {"covered": False, "gap": 0.0})
                entry["covered"] = False
                if done is not None and done.gap is not None:
                    entry["gap"] = round(max(entry["gap"] or 0.0, done.gap), 3)
                elif done is not None:
                    entry["gap"] = None  # drained but never answered again: unknown
        return dict(sorted(out.items()))

    def to_document(self) -> dict:
        return {
            "command": "restart",
            "rolling": True,
            "max_unavailable": self.max_unavailable,
            "processes": list(self.plan.processes),
            "batches_planned": [list(b.processes) for b in self.plan.batches],
            "batches": [b.to_document() for b in self.batches],
            "queues": self.queue_gaps(),
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "exit_code": self.exit_code,
            "problem": self.problem,
        }

    def lines(self) -> list[str]:
        """The plain-text report: one line per phase of each batch, the queues, the outcome."""
        out = []
        total = len(self.plan.batches)
        for b in self.batches:
            out.append(f"batch {b.number}/{total}: {', '.join(b.processes)}"
                       + (f" (gap {b.gap:.2f}s)" if b.gap is not None and self.plan.batches[b.number - 1].lonely else ""))
            out += [f"  {p.name:<8} {p.seconds:7.2f}s  {p.detail}" for p in b.phases]
            if b.state_file:
                out.append(f"  record: {b.state_file}")
        for q, entry in self.queue_gaps().items():
            gap = "unknown" if entry["gap"] is None else f"{entry['gap']:.2f}s"
            out.append(f"queue {q}: " + ("always consumed by a worker outside the batch" if entry["covered"]
                                         else f"consumed only by one batch: longest gap {gap}"))
        out.append(f"total {self.seconds:.2f}s, {len(self.batches)} of {total} batch(es) run")
        if self.problem:
            out.append(f"not done: {self.problem}")
        return out


# ----------------------------------------------------------------------- act

#: Seconds past a drained worker's in-flight fetch before it is stopped.
FETCH_MARGIN = 0.25


def fetch_window(app) -> float:
    """How long a fetch in flight when a worker's consumer was cancelled may still take a message.

    kombu's Redis transport waits for messages with a blocking ``BRPOP``
    (1 s; in kombu newer than 5.3, the ``polling_interval`` transport option). A cancel does not
    interrupt a ``BRPOP`` already sent: until it returns it can pop a message
    of the cancelled queue. The worker's loop puts such a message back at
    once (kombu rejects a message for a queue with no consumer, with
    requeue), but only while the loop runs: a worker already in its warm
    shutdown holds the message until it closes its connection (a probe
    waited 1.5 s for it in bench/rolling_bench.py while the other workers
    were idle), and a worker killed meanwhile loses it. So a drained worker
    is stopped only once this window has passed. The other transports
    fetch inside the loop: 0.
    """
    conn = app.connection_for_write()  # not connected: only its transport is looked at
    try:
        transport = conn.transport
        if transport.driver_type != "redis":
            return 0.0
        return float(getattr(transport, "brpop_timeout", 1) or 0)
    finally:
        conn.release()


#: ``on_phase(batch number, batches, phase, seconds since the roll began)``, at each phase's start.
PhaseCallback = Callable[[int, int, str, float], None]


def read_plan(infos: list[dict], names: list[str], app, app_spec: str, max_unavailable: int) -> Plan:
    """The plan for *names* (as :func:`rpc.expand_names` gives them) from what runs here now.

    *infos* is supervisord's ``getAllProcessInfo``; each running process's
    node is read from its worker's command line, and every local worker's
    queues from its ``-Q`` (else the app's configured queues).
    """
    infos = {rpc.full_name(i): i for i in infos}
    node_of = {}
    for name in names:
        pid = int(infos.get(name, {}).get("pid") or 0)
        nodes = restarting.worker_nodes([pid], app_spec) if pid else []
        if nodes:
            node_of[name] = nodes[0]
    configured = draining.configured_queues(app.conf.task_default_queue, app.conf.task_queues)
    local = draining.local_targets(discovery.scan(app_spec, discovery.app_root(app_spec)), configured)
    return plan(names, node_of, {t.node: t.queues or () for t in local}, max_unavailable)


def roll(
    app,
    app_spec: str | None,
    programs: Iterable[str],
    server,
    *,
    max_unavailable: int = DEFAULT_MAX_UNAVAILABLE,
    state_path: str | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    start_timeout: float = restarting.DEFAULT_START_TIMEOUT,
    timeout: float = DEFAULT_TIMEOUT,
    on_phase: PhaseCallback | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_drain: Callable | None = None,
    on_wait: Callable | None = None,
    remote_factory: Callable[[object], control.Remote] = control.Remote,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RollingResult:
    """Restart *programs* a batch of *max_unavailable* processes at a time (see the module's docstring).

    Refusals and an unreachable supervisord raise before anything is
    touched. Each batch's record is a temporary file, kept (and named in the
    result) when its kill left a survivor; with *state_path* every batch's
    record is kept, as ``STATE.1``, ``STATE.2``…
    """
    if app is None or not app_spec:
        raise UsageError("restart needs -A APP: the app whose workers it drains and pings")
    if grace < 0 or not drain_timeout > 0 or not start_timeout > 0:
        raise UsageError("--grace must not be negative; --drain-timeout and --start-timeout must be positive")
    if max_unavailable < 1:
        raise UsageError("--max-unavailable must be 1 or more")
    if state_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(state_path))):
        raise StateFileError(state_path, "its folder does not exist")
    infos = rpc.all_process_info(server)  # unreachable: nothing done
    names = rpc.expand_names(list(programs), infos)
    result = RollingResult(read_plan(infos, names, app, app_spec, max_unavailable), max_unavailable)
    result.warnings += result.plan.warnings()
    if on_plan is not None:  # before anything is touched: the queues that will have a gap
        on_plan(result.plan)
    scratch = tempfile.mkdtemp(prefix="celery-supervise-rolling-") if state_path is None else None
    began = clock()
    try:
        for batch in result.plan.batches:
            path = f"{state_path}.{batch.number}" if state_path else os.path.join(scratch, f"batch-{batch.number}.json")
            done = BatchResult(batch.number, batch.processes)
            result.batches.append(done)

            def phase(name, _n=batch.number):
                if on_phase is not None:
                    on_phase(_n, len(result.plan.batches), name, clock() - began)

            try:
                _batch(done, batch, result, app, app_spec, server, path, drain_timeout, grace, start_timeout,
                       timeout, phase, on_drain, on_wait, remote_factory, clock, sleep)
            except SuperviseError as exc:
                touched = done.phases and done.phases[-1].name != restarting.SAVEPID or result.batches[:-1]
                if not touched:
                    raise  # nothing stopped yet: the error as it is (exit 1)
                done.state_file = done.state_file or path
                scratch = None  # keep the records
                raise PartialError(f"{exc} (rolling restart, batch {batch.number}/{len(result.plan.batches)}; "
                                   f"{_replaced(result)})") from None
            if state_path or done.kill is not None and done.kill.partial:
                done.state_file = path
                scratch = None if state_path is None else scratch
            if done.problem:
                result.problem = (f"batch {batch.number}/{len(result.plan.batches)}: {done.problem}; "
                                  f"{_replaced(result)}")
                break
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def _replaced(result: RollingResult) -> str:
    # Replaced: started again and every new worker answered (a leftover that survived the kill aside).
    done = [p for b in result.batches if b.new_nodes and None not in b.new_nodes.values() for p in b.processes]
    left = [p for p in result.plan.processes if p not in done]
    return (f"replaced: {', '.join(done) or 'none'}; not replaced: {', '.join(left) or 'none'} "
            "(run restart --rolling again to finish)")


def _batch(done: BatchResult, batch: Batch, result: RollingResult, app, app_spec, server, path, drain_timeout,
           grace, start_timeout, timeout, phase, on_drain, on_wait, remote_factory, clock, sleep) -> None:
    def took(name, started, detail=""):
        done.phases.append(restarting.Phase(name, clock() - started, detail))

    names = list(batch.processes)

    # 1. Record the batch's trees and active tasks.
    phase(restarting.SAVEPID)
    t = clock()
    saved = restarting.record_programs(path, app, app_spec, server, names, timeout)
    result.warnings += saved.warnings
    done.nodes = restarting.nodes_of(saved)
    took(restarting.SAVEPID, t, f"{len(saved.snapshot.workers)} worker(s), "
         f"{sum(len(w.procs) for w in saved.snapshot.workers)} process(es), "
         f"{sum(len(w.tasks) for w in saved.snapshot.workers)} active task(s)")

    # 2. Drain those workers only; the rest go on consuming.
    phase(restarting.DRAIN)
    t = clock()
    cancels = restarting.CancelClock(remote_factory, clock)
    if done.nodes:
        done.drain = drained = drain(app, app_spec, destinations=done.nodes, timeout=drain_timeout,
                                                on_progress=on_drain, remote_factory=cancels)
        result.warnings += drained.warnings
        settle = ""
        if drained.drained:
            # Until a fetch sent before the cancel has returned, the worker may
            # still pop a message (see fetch_window): let it end, then a ping
            # answered after it shows the loop has handled what it brought.
            window = fetch_window(app)
            if window:
                wait = window + FETCH_MARGIN
                sleep(wait)
                with remote_factory(app) as remote:
                    remote.ping(list(done.nodes), max(timeout, 0.05))
                settle = f" (+{wait:.2f}s for the broker's fetch in flight)"
        took(restarting.DRAIN, t, f"{len(drained.targets)} worker(s) "
             + ("drained" + settle if drained.drained else f"still hold {len(drained.held)} task(s)"))
        if not drained.drained:
            done.resumed, unconfirmed = resume(remote_factory, app, drained, timeout)
            busy = ", ".join(dict.fromkeys(h.node for h in drained.held)) or ", ".join(drained.silent)
            done.problem = (f"the drain timed out after {drained.elapsed:.1f}s ({busy} still busy): nothing of "
                            f"this batch was stopped, and its workers consume their queues again (add_consumer)")
            if unconfirmed:
                done.problem += (f"; no acknowledgement from {', '.join(unconfirmed)}: check with "
                                 "`celery inspect active_queues`")
            return
    else:
        took(restarting.DRAIN, t, "no worker running; nothing to drain")

    # 3. Stop them, side by side.
    phase(restarting.STOP)
    t = clock()
    was = restarting.side_by_side(rpc.stop_process, server, names)
    took(restarting.STOP, t, f"{sum(was)} of {len(names)} process(es) were running")

    # 4. Their attached leftovers; the detached are spared.
    phase(restarting.KILL)
    t = clock()
    # The verb is the command's (`restart`); its argv says --rolling. One run per batch.
    done.kill = killed = kill(path, grace=grace, app_spec=app_spec, on_wait=on_wait, audit=AuditLog("restart"))
    result.warnings += killed.warnings
    took(restarting.KILL, t, restarting._kill_summary(killed))

    # 5. Start them again.
    phase(restarting.START)
    t = started_at = clock()
    pids = dict(zip(names, restarting.side_by_side(rpc.start_process, server, names)))
    took(restarting.START, t, ", ".join(f"{n} PID {pid}" for n, pid in pids.items()))

    # 6. Nothing more is touched until every new worker answers.
    phase(restarting.READY)
    t = clock()
    with remote_factory(app) as remote:
        answered, silent = restarting.wait_answering(
            remote.ping, lambda: restarting.worker_nodes(pids.values(), app_spec), started_at + start_timeout,
            clock=clock)
    done.new_nodes = {n: at - started_at for n, at in answered.items()}
    done.new_nodes.update({n: None for n in silent})
    if cancels.sent_at is not None and answered and not silent:
        done.gap = max(answered.values()) - cancels.sent_at
    took(restarting.READY, t, f"{len(answered)} worker(s) answered a ping"
         + (f"; not: {', '.join(silent)}" if silent else ""))
    problems = []
    if killed.partial:
        problems.append("some leftovers of the old workers could not be killed (see the kill report)")
    if silent:
        problems.append(f"the new worker(s) did not answer a ping within {start_timeout:g}s: {', '.join(silent)}; "
                        "no other old worker was touched")
    done.problem = "; ".join(problems) or None


def resume(remote_factory, app, drained: draining.DrainResult, timeout: float) -> tuple[dict[str, list[str]], list[str]]:
    """Give every drained worker back the queues the drain cancelled: ``({node: queues}, unacknowledged nodes)``.

    Called when the roll stops with the batch still running: a worker left
    with its consumers cancelled would run on, consuming nothing.
    """
    by_queue: dict[str, list[str]] = {}
    resumed: dict[str, list[str]] = {}
    for t in drained.targets:
        for q in drained.queues_of(t.node):
            by_queue.setdefault(q, []).append(t.node)
            resumed.setdefault(t.node, []).append(q)
    unconfirmed: set[str] = set()
    with remote_factory(app) as remote:
        for queue, nodes in by_queue.items():
            acked = set()
            with contextlib.suppress(SuperviseError):  # reported below, as unacknowledged
                acked = remote.add_consumer(queue, nodes, timeout)
            unconfirmed.update(n for n in nodes if n not in acked)
    return resumed, sorted(unconfirmed)


__all__ = ["roll", "plan", "batches_of", "lonely_queues", "RollingResult", "BatchResult", "Plan", "Batch",
           "RollRefused", "DEFAULT_MAX_UNAVAILABLE"]
