"""Restarting supervisord programs that run Celery workers, and timing it.

:func:`restart` runs the phases. What they produce, and the two pieces
with a clock in them, are kept apart so that tests can drive them with a
fake one:

* :class:`CancelClock` wraps the drain's remote control and notes when the
  last ``cancel_consumer`` went out: from then on the old workers take no
  task.
* :func:`wait_answering` pings the new workers until each has answered:
  from then on they consume again.

The time between the two is the **consume gap**: how long the restarted
workers' queues had nobody taking new tasks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .. import options
from ..celery_side import control, discovery
from ..celery_side.drain import seconds
from ..errors import EXIT_OK, EXIT_PARTIAL, PartialError, StateFileError, SuperviseError, SupervisorError, UsageError
from ..processes import procs
from ..processes.audit import AuditLog
from ..processes.kill import FAILED, GONE, KILLED, SPARED, KillReport
from ..processes.plan import Policy
from ..processes.statefile import proc_to_dict
from .drain import DEFAULT_DRAIN_TIMEOUT, drain
from .kill import DEFAULT_GRACE, kill
from .savepid import DEFAULT_TIMEOUT, Targets, savepid

SAVEPID = "savepid"
DRAIN = "drain"
STOP = "stop"
KILL = "kill"
START = "start"
READY = "ready"

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
    save: object = None  # commands.savepid.SaveResult
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

    def to_document(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "processes": self.processes,
            "phases": [{"name": p.name, "seconds": round(p.seconds, 3), "detail": p.detail} for p in self.phases],
            "total": round(self.total, 3),
            "consume_gap": seconds(self.consume_gap),
            "consume_gaps": {n: round(s, 3) for n, s in self.consume_gaps.items()},
            "old_nodes": self.nodes,
            "new_nodes": {n: seconds(s) for n, s in self.new_nodes.items()},
            "stopped": self.stopped,
            "started": self.started,
            "drain": self.drain.to_document() if self.drain is not None else None,
            "kill": None if self.kill is None else {
                "summary": self.kill.counts(),
                "failed": [{**proc_to_dict(o.proc), "reason": o.reason} for o in self.kill.by_status(FAILED)],
                "audit": self.kill.audit,
            },
            "state_file": self.state_file,
            "problem": self.problem,
            "warnings": self.warnings,
        }


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


# ---------------------------------------------------------------------- verb


def restart(
    app,
    app_spec: str | None,
    programs: Iterable[str],
    server,
    *,
    state_path: str | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    timeout: float = DEFAULT_TIMEOUT,
    on_drain: Callable | None = None,
    on_wait: Callable | None = None,
    remote_factory: Callable[[object], control.Remote] = control.Remote,
    clock: Callable[[], float] = time.monotonic,
) -> RestartResult:
    """Restart supervisord *programs* (an ``rpc.Server``'s) without losing a task or a leftover.

    savepid -> drain -> stop -> kill -> start -> ready. Errors before the
    stop raise and change nothing (beyond a drain's cancels, which the
    message names). A drain that times out returns with ``problem`` set and
    the workers still running: they are never stopped with a task in hand.
    A kill that leaves a process alive does not keep the new workers from
    starting; it sets ``problem``.
    """
    from ..supervisord import rpc

    if app is None or not app_spec:
        raise UsageError("restart needs -A APP: the app whose workers it drains and pings")
    if grace < 0 or not drain_timeout > 0 or not start_timeout > 0:
        raise UsageError("--grace must not be negative; --drain-timeout and --start-timeout must be positive")
    if state_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(state_path))):
        raise StateFileError(state_path, "its folder does not exist")
    names = rpc.expand_names(list(programs), rpc.all_process_info(server))  # unreachable: nothing done
    result = RestartResult(processes=names)
    scratch = None
    if state_path is None:
        scratch = tempfile.mkdtemp(prefix="celery-supervise-restart-")
        state_path = os.path.join(scratch, "state.json")
    else:
        result.state_file = state_path
    try:
        _restart(result, app, app_spec, server, state_path, drain_timeout, grace, start_timeout, timeout,
                 on_drain, on_wait, remote_factory, clock)
        if result.kill is not None and result.kill.partial:
            result.state_file = state_path  # for a later `celery-supervise kill` of what survived
    except BaseException as exc:
        if result.stopped and not (result.kill and not result.kill.partial):
            result.state_file = state_path  # the only record of what the stop left behind
            scratch = None
        if result.stopped and isinstance(exc, SuperviseError):
            # Exit 1 would say "nothing changed"; the workers were stopped.
            kept = f"; the record of the old workers is kept in {state_path}" if scratch is None else ""
            raise PartialError(f"{exc} (after the stop of {', '.join(names)}: "
                               f"{'started again' if result.started else 'not started again'}{kept})") from None
        raise
    finally:
        if scratch is not None and result.state_file != state_path:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def _restart(result, app, app_spec, server, path, drain_timeout, grace, start_timeout, timeout,
             on_drain, on_wait, remote_factory, clock) -> None:
    from ..supervisord import rpc

    def phase(name, started, detail=""):
        result.phases.append(Phase(name, clock() - started, detail))

    t = clock()
    result.save = saved = record_programs(path, app, app_spec, server, result.processes, timeout)
    result.warnings += saved.warnings
    result.nodes = nodes_of(saved)
    phase(SAVEPID, t, f"{len(saved.snapshot.workers)} worker(s), "
          f"{sum(len(w.procs) for w in saved.snapshot.workers)} process(es), "
          f"{sum(len(w.tasks) for w in saved.snapshot.workers)} active task(s)")

    t = clock()
    cancels = CancelClock(remote_factory, clock)
    if result.nodes:
        result.drain = drained = drain(app, app_spec, destinations=result.nodes, timeout=drain_timeout,
                                       on_progress=on_drain, remote_factory=cancels)
        result.warnings += drained.warnings
        phase(DRAIN, t, f"{len(drained.targets)} worker(s) "
              + ("drained" if drained.drained else f"still hold {len(drained.held)} task(s)"))
        if not drained.drained:
            result.problem = (
                f"the drain timed out after {drained.elapsed:.1f}s: nothing was stopped, the workers finish "
                "their tasks but no longer consume their queues; run restart again (with a longer "
                "--drain-timeout) to finish, or `celery control add_consumer` to resume"
            )
            return
    else:
        phase(DRAIN, t, "no worker running; nothing to drain")

    t = clock()
    # One call per process, all at once: each blocks until its process has
    # exited (or started), and one slow worker should not hold up the rest.
    was_running = [name for name, running in zip(result.processes, side_by_side(rpc.stop_process, server, result.processes))
                   if running]
    result.stopped = True
    phase(STOP, t, f"{len(was_running)} of {len(result.processes)} process(es) were running")

    t = clock()
    result.kill = killed = kill(path, grace=grace, app_spec=app_spec, on_wait=on_wait, audit=AuditLog("restart"))
    result.warnings += killed.warnings
    phase(KILL, t, _kill_summary(killed))

    t = started_at = clock()
    # new_nodes counts from here: supervisord spawns the process at once and
    # only then waits out startsecs, so the worker's own start-up (spawn to
    # first answer) spans both the start and the ready phases.
    pids = dict(zip(result.processes, side_by_side(rpc.start_process, server, result.processes)))
    result.started = True
    phase(START, t, ", ".join(f"{name} PID {pid}" for name, pid in pids.items()))

    t = clock()
    with remote_factory(app) as remote:
        answered, silent = wait_answering(remote.ping, lambda: worker_nodes(pids.values(), app_spec),
                                                     started_at + start_timeout, clock=clock)
    result.new_nodes = {n: at - started_at for n, at in answered.items()}
    result.new_nodes.update({n: None for n in silent})
    if cancels.sent_at is not None:
        result.consume_gaps = {n: at - cancels.sent_at for n, at in answered.items()}
    phase(READY, t, f"{len(answered)} worker(s) answered a ping"
          + (f"; not: {', '.join(silent)}" if silent else ""))
    problems = []
    if killed.partial:
        problems.append("some leftovers of the old workers could not be killed (see the kill report)")
    if silent:
        problems.append(f"the new workers did not answer a ping within {start_timeout:g}s: {', '.join(silent)}")
    result.problem = "; ".join(problems) or None


def record_programs(path: str, app, app_spec: str | None, server, names: Iterable[str], timeout: float):
    """savepid of supervisord's processes *names* alone, into *path*; refused when supervisord did not say which.

    Restart, rolling restart and their dry run all start here. Discovery
    that fell back to a scan of local processes would also record other
    programs' workers, which a restart of *names* must never touch.
    """
    targets = Targets(app=app, app_spec=app_spec, supervisor_url=server.url, programs=tuple(names),
                      timeout=timeout, supervisor_auth=(server.username, server.password))
    saved = savepid(path, targets, Policy())
    if saved.snapshot.workers and not saved.snapshot.source.startswith("supervisor"):
        raise SupervisorError(server.url, "did not say which processes these programs run; nothing was stopped")
    return saved


def nodes_of(saved) -> list[str]:
    """The node names of a savepid's workers, in order, once each."""
    return list(dict.fromkeys(w.node for w in saved.snapshot.workers if w.node))


def side_by_side(call, server, names: list[str], *, on_wait: Callable[[int, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> list:
    """``[call(server, name) for name in names]``, run side by side; the first error is raised.

    Each call of supervisord's ``stopProcess``/``startProcess`` with
    ``wait=True`` blocks until its process has stopped (or started), and one
    slow worker should not hold up the rest. *on_wait(left, elapsed)* is
    called about once a second while calls are still running.
    """
    if len(names) < 2 and on_wait is None:
        return [call(server, name) for name in names]
    started = clock()
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        futures = [pool.submit(call, server, name) for name in names]
        while on_wait is not None:
            _, pending = wait(futures, timeout=1.0)
            if not pending:
                break
            on_wait(len(pending), clock() - started)
        return [f.result() for f in futures]


def worker_nodes(pids: Iterable[int], app_spec: str | None) -> list[str]:
    """Node names of the Celery workers of *app_spec* running at, or below, each of *pids*.

    A supervisord program may run the worker through a shell or wrapper; a
    process that has not exec'd Celery yet has no node name, so callers ask
    again until every one has.
    """
    nodes = []
    for pid in pids:
        main = discovery.worker_main_under(pid, app_spec)
        p = procs.read_proc(main) if main else None
        command = discovery.parse_worker_cmdline(p.cmdline) if p else None
        if command is not None and command.node not in nodes:
            nodes.append(command.node)
    return nodes


def _kill_summary(report: KillReport) -> str:
    count = {s: len(report.by_status(s)) for s in (KILLED, SPARED, GONE, FAILED)}
    return f"killed {count[KILLED]}, spared {count[SPARED]}, already gone {count[GONE]}, failed {count[FAILED]}"
