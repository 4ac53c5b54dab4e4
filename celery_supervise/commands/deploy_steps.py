"""The steps of ``celery-supervise deploy``, with and without supervisord's shutdown.

:func:`celery_supervise.commands.deploy.deploy` sets up a :class:`Run` and
calls :func:`with_shutdown` or :func:`without_shutdown`; each step fills in
the run's :class:`~celery_supervise.commands.deploy.DeployResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..celery_side import discovery
from ..errors import SuperviseError, SupervisorError
from ..processes import procs
from ..processes.plan import Policy
from ..supervisord import daemon, rpc
from . import kill as kill_verb, requeue as requeue_verb, restart as restart_verb, savepid as savepid_verb
from .deploy import (
    KILL, READY, REQUEUE, RUNNING, SAVEPID, SHUTDOWN, START, STOP, UNKNOWN, DeployResult, Options, Plan, Progress, TaskFate,
    fates,
)
from .restart import Phase, wait_answering


@dataclass
class Run:
    """One deploy in progress: the plan, the seams, and the result being filled in."""

    plan: Plan
    result: DeployResult
    progress: Progress
    load_app: Callable[[], object]
    on_wait: Callable | None
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    start_supervisord: Callable[[str], None]
    remote_factory: Callable
    step_number: int = 0
    app: object = None

    @property
    def options(self) -> Options:
        return self.plan.options

    def step(self, text: str) -> None:
        self.step_number += 1
        self.progress.step(self.step_number, self.plan.steps, text)

    def phase(self, name: str, started: float, detail: str = "") -> None:
        self.result.phases.append(Phase(name, self.clock() - started, detail))


def _failed_before_the_stop(run: Run, cause: str) -> None:
    run.result.cause = cause
    run.result.problems.append("savepid failed; nothing was stopped")


def _load_app(run: Run) -> bool:
    if run.app is not None:
        return True
    try:
        run.app = run.load_app()
    except SuperviseError as exc:
        _failed_before_the_stop(run, str(exc))
        return False
    return True


def _record(run: Run, supervisor_url: str | None, names: list[str]) -> bool:
    """savepid; ``False`` (and the result says why) when it failed: nothing is stopped then."""
    o, result = run.options, run.result
    t = run.clock()
    if not _load_app(run):
        return False
    try:
        targets = savepid_verb.Targets(
            app=run.app, app_spec=o.app_spec, supervisor_url=supervisor_url, programs=tuple(names),
            timeout=o.reply_timeout, supervisor_auth=(run.plan.server.username, run.plan.server.password))
        result.save = saved = savepid_verb.savepid(result.state_file, targets, Policy())
    except SuperviseError as exc:
        _failed_before_the_stop(run, str(exc))
        return False
    result.warnings += [w for w in saved.warnings if not (saved.broker_error and w.startswith(saved.broker_error))]
    if saved.broker_error:  # savepid's exit 3: the record lacks the tasks a stop would cut off
        _failed_before_the_stop(run, saved.problem)
        return False
    snap = saved.snapshot
    run.phase(SAVEPID, t, f"{len(snap.workers)} worker(s), {sum(len(w.procs) for w in snap.workers)} process(es), "
              f"{sum(len(w.tasks) for w in snap.workers)} active task(s)")
    return True


def _dry_run(run: Run, after: str) -> None:
    run.progress.note(f"dry run: this is what kill would do after {after}")
    t = run.clock()
    run.result.kill = kill_verb.kill(run.result.state_file, grace=run.options.grace, dry_run=True,
                                      app_spec=run.options.app_spec)
    run.phase(KILL, t, "dry run: " + run.result.kill.summary())
    run.result.tasks = [TaskFate(task.id, task.name, w.node, RUNNING, "running at savepid: a stop may cut it off")
                        for w in run.result.save.snapshot.workers for task in w.tasks]


def _kill(run: Run) -> None:
    o, result = run.options, run.result
    run.step(f"killing what the workers left behind (grace {o.grace:g}s)")
    t = run.clock()
    result.kill = killed = kill_verb.kill(result.state_file, grace=o.grace, app_spec=o.app_spec, on_wait=run.on_wait)
    result.warnings += killed.warnings
    run.phase(KILL, t, killed.summary())
    if killed.partial:  # the workers are started all the same: a worker down is worse than a stray process
        result.problems.append(f"some leftovers of the old workers could not be killed (see the kill report); "
                               f"`celery-supervise kill {result.state_file}` tries again")


def _tasks(run: Run) -> None:
    """requeue, or its dry run for the decisions alone: which recorded tasks did not finish.

    A requeue that fails does not keep the workers from starting again; it
    keeps the record, and the summary says how to re-send.
    """
    o, result = run.options, run.result
    if o.requeue:
        run.step("re-sending the tasks the stop cut off")
    t = run.clock()
    try:
        result.requeue = rq = requeue_verb.requeue(result.state_file, run.app, journal_dir=o.journal,
                                                 dry_run=not o.requeue)
    except SuperviseError as exc:
        result.tasks = [TaskFate(task.id, task.name, w.node, UNKNOWN, f"unknown: {exc}", requeue_verb.WOULD_RESEND)
                        for w in result.save.snapshot.workers for task in w.tasks]
        if o.requeue:
            result.problems.append(f"requeue failed: {exc}")
            run.phase(REQUEUE, t, "failed")
        else:
            result.warnings.append(f"could not tell which recorded tasks finished: {exc}")
        return
    result.warnings += rq.warnings
    result.tasks = fates(rq)
    if o.requeue:
        run.phase(REQUEUE, t, rq.summary())
        if rq.partial:
            result.problems.append(f"the broker failed during requeue ({rq.summary()}); "
                                   "run requeue again to send the rest")


def _wait_ready(run: Run, nodes: Callable[[], list[str]], expected: int, started_at: float) -> None:
    """Ping the new workers until each answers (at most --start-timeout from *started_at*)."""
    o, result = run.options, run.result
    if expected == 0:
        run.progress.note("no worker was running before the deploy; not waiting for one")
        return
    t = run.clock()
    run.progress.note(f"waiting for {expected} worker(s) to answer a ping (at most {o.start_timeout:g}s)")

    def enough():  # a process not yet exec'd into Celery has no node name yet
        found = nodes()
        return found if len(found) >= expected else []

    with run.remote_factory(run.app) as remote:
        answered, silent = wait_answering(remote.ping, enough, started_at + o.start_timeout,
                                          clock=run.clock, sleep=run.sleep)
    result.new_nodes = {n: at - started_at for n, at in answered.items()}
    result.new_nodes.update({n: None for n in silent})
    run.phase(READY, t, f"{len(answered)} worker(s) answered a ping"
              + (f": {', '.join(answered)}" if answered else "") + (f"; not: {', '.join(silent)}" if silent else ""))
    if silent:
        result.problems.append(f"the new workers did not answer a ping within {o.start_timeout:g}s: "
                               f"{', '.join(silent)}")


# ------------------------------------------------------------ with shutdown


def _worker_programs(run: Run, infos: list[dict]) -> list[str]:
    """supervisord's processes that run a worker of -A APP from this project (and match --program)."""
    app_spec = run.options.app_spec
    local = discovery.scan(app_spec, discovery.app_root(app_spec))
    return [p.name for p in rpc.running_processes(infos, run.options.programs)
            if discovery.workers_under(p.pid, local)]


def with_shutdown(run: Run) -> None:
    o, result, server = run.options, run.result, run.plan.server
    sup = daemon.running_supervisord(server)
    result.old_supervisord = sup.pid if sup else None
    run.step(f"recording worker trees and active tasks in {result.state_file}")
    if sup is not None:
        if not _load_app(run):
            return
        result.processes = _worker_programs(run, rpc.all_process_info(server))
        if not _record(run, server.url, result.processes):
            return
    else:
        result.warnings.append(f"supervisord at {server.url} is not running: recorded every worker of "
                               f"{o.app_spec} this host runs, from this project")
        if not _record(run, None, []):
            return
    if o.dry_run:
        _dry_run(run, "the shutdown")
        return

    t = run.clock()
    if sup is None:
        run.step("supervisord is not running; nothing to shut down")
        run.phase(SHUTDOWN, t, "not running")
    else:
        run.step(f"supervisorctl shutdown (supervisord PID {sup.pid})")
        rpc.call(server.url, server.proxy().supervisor.shutdown)  # raises before anything changed
        result.changed = True
        if not _wait_exit(run, sup):
            result.keep_record = True
            result.problems.append(
                f"supervisord (PID {sup.pid}) still running after {o.shutdown_timeout:g}s; nothing killed. Once it "
                f"has exited: `celery-supervise -A {o.app_spec} kill {result.state_file}`, then "
                f"`supervisord -c {o.configuration}`")
            run.phase(SHUTDOWN, t, f"PID {sup.pid} still running after {o.shutdown_timeout:g}s")
            return
        run.phase(SHUTDOWN, t, f"supervisord PID {sup.pid} exited")

    result.changed = True
    _kill(run)
    _tasks(run)
    if not o.start:
        run.progress.note("not starting supervisord again (--no-start)")
        return

    run.step("starting supervisord")
    t = started_at = run.clock()
    run.start_supervisord(o.configuration)
    result.started = True  # it daemonized; it may still fail to answer
    new = result.new_supervisord = _wait_answer(run, server, started_at + o.start_timeout, sup.pid if sup else None)
    run.phase(START, t, f"supervisord PID {new}")

    def nodes():
        infos = rpc.all_process_info(server)
        return restart_verb.worker_nodes([p.pid for p in rpc.running_processes(infos, o.programs)], o.app_spec)

    _wait_ready(run, nodes, len(result.save.snapshot.workers), started_at)
    if result.problem is None:
        run.progress.note(f"done: supervisord is running (PID {new})"
                          + (f", {len(result.new_nodes)} worker(s) answered a ping" if result.new_nodes else ""))


def _wait_exit(run: Run, sup: procs.Proc) -> bool:
    """Poll until supervisord has exited (a zombie has); ``False`` after --shutdown-timeout."""
    timeout = run.options.shutdown_timeout
    return daemon.wait_exit(sup, timeout, clock=run.clock, sleep=run.sleep,
                            on_wait=lambda elapsed: run.progress.waiting("for supervisord to exit", elapsed, timeout))


def _wait_answer(run: Run, server: rpc.Server, deadline: float, old_pid: int | None) -> int:
    """The PID of the new supervisord, once it answers at *server*."""
    return daemon.wait_answer(server, deadline, old_pid, clock=run.clock, sleep=run.sleep,
                              late=f"did not answer within {run.options.start_timeout:g}s of "
                              f"`supervisord -c {run.options.configuration}`")


# --------------------------------------------------------- without shutdown


def without_shutdown(run: Run) -> None:
    o, result, server = run.options, run.result, run.plan.server
    infos = rpc.all_process_info(server)  # unreachable: nothing done
    result.old_supervisord = int(rpc.call(server.url, server.proxy().supervisor.getPID))
    run.step(f"recording worker trees and active tasks in {result.state_file}")
    if not _load_app(run):
        return
    if o.programs:  # as named: running or not (a stopped one is just started)
        result.processes = [rpc.full_name(i) for i in infos if rpc.matches(i, o.programs)]
        if not result.processes:
            known = ", ".join(sorted(rpc.full_name(i) for i in infos)) or "none"
            raise SupervisorError(server.url, f"no process matches --program {' '.join(o.programs)} (known: {known})")
    else:
        result.processes = _worker_programs(run, infos)
        if not result.processes:
            raise SupervisorError(server.url, f"none of its running programs runs a worker of {o.app_spec} from "
                                  "this project; name them with --program")
    if not _record(run, server.url, result.processes):
        return
    if result.save.snapshot.workers and not result.save.snapshot.source.startswith("supervisor"):
        raise SupervisorError(server.url, "did not say which processes these programs run; nothing was stopped")
    if o.dry_run:
        _dry_run(run, f"the stop of {', '.join(result.processes)}")
        return

    names = result.processes
    run.step(f"stopping {', '.join(names)} (supervisord PID {result.old_supervisord})")
    t = run.clock()
    result.changed = True
    stopped = restart_verb.side_by_side(
        rpc.stop_process, server, names, clock=run.clock,
        on_wait=lambda left, elapsed: run.progress.waiting(f"for {left} process(es) to stop", elapsed, None))
    run.phase(STOP, t, f"{sum(stopped)} of {len(names)} process(es) were running")

    _kill(run)
    _tasks(run)
    if not o.start:
        run.progress.note(f"not starting {', '.join(names)} again (--no-start)")
        return

    run.step(f"starting {', '.join(names)}")
    t = started_at = run.clock()
    pids = dict(zip(names, restart_verb.side_by_side(rpc.start_process, server, names)))
    result.started = True
    run.phase(START, t, ", ".join(f"{name} PID {pid}" for name, pid in pids.items()))
    _wait_ready(run, lambda: restart_verb.worker_nodes(pids.values(), o.app_spec),
                len(result.save.snapshot.workers), started_at)
    if result.problem is None:
        run.progress.note(f"done: {', '.join(names)} running again under supervisord (PID {result.old_supervisord})"
                          + (f", {len(result.new_nodes)} worker(s) answered a ping" if result.new_nodes else ""))
