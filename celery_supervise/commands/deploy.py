"""``celery-supervise -A APP deploy``: restart supervisord's Celery workers for a deploy, leaving nothing behind.

Two ways, chosen with ``--no-shutdown``:

* **shutdown** (the default; what ``scripts/deploy.sh`` has always done):
  savepid -> ``supervisorctl shutdown`` -> wait for supervisord to exit ->
  kill -> [requeue] -> ``supervisord -c CONF`` -> ready;
* **no shutdown** (containers, where supervisord is PID 1 and its exit
  ends the container): savepid -> ``stopProcess`` of the worker programs,
  side by side -> kill -> [requeue] -> ``startProcess`` of the same -> ready.

Each step is the tool's own: :func:`celery_supervise.operations.savepid`,
:func:`~celery_supervise.operations.kill` and
:func:`~celery_supervise.operations.requeue` (with ``dry_run`` when
``--requeue`` is not given, for its decisions alone), and the ping wait of
``restart``. Plan, then act: :func:`plan` checks every option and what it
can of the surroundings (the config supervisord will be started with, the
executable), changing nothing; :func:`deploy` carries the plan out. Its
seams are the clock, the supervisord starter, the broker remote and the
Celery app loader; supervisord itself is reached through the plan's
:class:`~celery_supervise.rpc.Server`.

Whatever happens, the result says which recorded tasks did not finish:
:func:`fates` reads requeue's decisions (a task journal says which
finished; without one that is unknown), and the record is kept, its path
printed, while something is left to re-send.

Exit codes: 0 done; 1 nothing was changed (a bad option or config,
savepid failed, supervisord could not be asked to stop); 2 usage; 3 the
workers were stopped but something went wrong after (supervisord did not
exit in time, a leftover survived, requeue failed, supervisord or the
workers did not come back).
"""

from __future__ import annotations

import http.client
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Callable

from .. import control, discovery, operations, options, procs, report, requeue as requeuing, rpc
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, StateFileError, SuperviseError, SupervisorError, UsageError
from ..kill import KillReport
from ..plan import Policy
from ..restart import Phase, wait_answering

DEFAULT_SHUTDOWN_TIMEOUT = options.SHUTDOWN_TIMEOUT
DEFAULT_START_TIMEOUT = options.START_TIMEOUT
#: Progress and error lines on stderr start with this variable's value (scripts/deploy.sh sets its own name).
LOG_NAME_ENV = "CELERY_SUPERVISE_LOG_NAME"
LOG_NAME = "celery-supervise deploy"
#: How often the wait for supervisord's exit (or answer) looks.
POLL_INTERVAL = 0.1

SAVEPID, SHUTDOWN, STOP, KILL, REQUEUE, START, READY = (
    "savepid", "shutdown", "stop", "kill", "requeue", "start", "ready")

# What became of a recorded task (see fates()).
FINISHED = "finished"
CUT_OFF = "cut off"
UNKNOWN = "unknown"
REDELIVERED = "redelivered"
CANNOT = "cannot be re-sent"
ALREADY = "re-sent before"
RUNNING = "running"  # a dry run: nothing was stopped


# ---------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Options:
    """What the user asked for, as parsed by the CLI."""

    app_spec: str | None
    configuration: str | None = None
    supervisor_url: str | None = None
    state: str | None = None
    grace: float = operations.DEFAULT_GRACE
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    start_timeout: float = DEFAULT_START_TIMEOUT
    reply_timeout: float = operations.DEFAULT_TIMEOUT
    start: bool = True
    dry_run: bool = False
    requeue: bool = False
    journal: str | None = None
    shutdown: bool = True
    programs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Checked options, and where supervisord is."""

    options: Options
    server: rpc.Server
    supervisord: str | None = None  # the executable that starts it again (shutdown mode)

    @property
    def steps(self) -> int:
        o = self.options
        return 3 + int(o.requeue) + int(o.start)


def plan(options: Options, *, find_server: Callable = rpc.find_server,
         which: Callable[[str], str | None] = shutil.which) -> Plan:
    """Check *options* and the surroundings; change nothing. Raises what a deploy would stumble on."""
    o = options
    if not o.app_spec:
        raise UsageError("deploy needs -A APP: the app whose workers it records and restarts")
    if o.grace < 0 or not o.shutdown_timeout > 0 or not o.start_timeout > 0 or not o.reply_timeout > 0:
        raise UsageError("--grace must not be negative; --shutdown-timeout, --start-timeout and "
                         "--reply-timeout must be positive")
    if o.journal and not o.requeue:
        raise UsageError("--journal is what --requeue reads: pass both, or neither")
    if o.state is not None and not os.path.isdir(os.path.dirname(os.path.abspath(o.state))):
        raise StateFileError(o.state, "its folder does not exist")
    if o.configuration is not None and not os.access(o.configuration, os.R_OK):
        raise SupervisorError(o.configuration, f"cannot read supervisord configuration {o.configuration}")
    supervisord = None
    if o.shutdown and o.start:
        if o.configuration is None:
            raise UsageError("deploy starts supervisord again with `supervisord -c CONF`: pass -c CONF (or set "
                             "SUPERVISORD_CONF), or --no-start, or --no-shutdown to restart the programs only")
        supervisord = find_supervisord(which)
        check_config(o.configuration)
    if o.shutdown and not o.configuration and not o.supervisor_url:
        raise UsageError("deploy needs -c CONF or --supervisor-url to reach the supervisord it shuts down")
    return Plan(o, find_server(o.supervisor_url, o.configuration), supervisord)


def find_supervisord(which: Callable[[str], str | None] = shutil.which) -> str:
    """The ``supervisord`` beside this Python (the one its supervisor package installed), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "supervisord")
    if os.access(beside, os.X_OK):
        return beside
    found = which("supervisord")
    if found is None:
        raise SupervisorError("supervisord", "is neither beside this Python nor on PATH: it cannot be started again")
    return found


def check_config(conf: str) -> None:
    """Read *conf* as ``supervisord -c CONF`` will, before anything is stopped.

    A config supervisord would refuse (a missing log folder, a syntax error)
    or one that sets ``nodaemon=true`` (then ``supervisord -c`` never
    returns) would leave the host without workers after the shutdown.
    """
    from supervisor.options import ServerOptions

    options = ServerOptions()

    def usage(message):  # ServerOptions would print it and exit(2)
        raise SupervisorError(conf, f"supervisord would not start with it: {' '.join(str(message).split())}")

    options.usage = usage
    options.realize(args=["-c", conf], progname="supervisord")
    if options.nodaemon:
        raise SupervisorError(conf, "sets nodaemon=true, so `supervisord -c` would never return: set "
                              "nodaemon=false, or use --no-shutdown (restart the programs, not supervisord)")


# ------------------------------------------------------------------ result


@dataclass(frozen=True)
class TaskFate:
    """What became of one task savepid recorded as running."""

    id: str
    name: str
    node: str | None
    fate: str  # FINISHED, CUT_OFF, UNKNOWN, REDELIVERED, CANNOT, ALREADY or RUNNING
    reason: str
    action: str = "-"  # requeue's: re-sent, failed, would re-send, skipped; "-" when not asked

    @property
    def finished(self) -> bool:
        return self.fate == FINISHED

    @property
    def left(self) -> bool:
        """Still to be re-sent by hand (`celery-supervise requeue STATE`)."""
        return self.action in (operations.WOULD_RESEND, operations.FAILED)


@dataclass
class DeployResult:
    """What a deploy did, phase by phase; ``problem`` says why it stopped short."""

    shutdown: bool  # the mode: supervisord shut down, or only its worker programs stopped
    dry_run: bool
    state_file: str
    app_spec: str
    phases: list[Phase] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)  # supervisord's processes running the workers
    old_supervisord: int | None = None
    new_supervisord: int | None = None
    save: operations.SaveResult | None = None
    kill: KillReport | None = None
    requeue: operations.RequeueResult | None = None  # the real one with --requeue, else its dry run
    tasks: list[TaskFate] = field(default_factory=list)
    new_nodes: dict[str, float | None] = field(default_factory=dict)
    changed: bool = False  # something was stopped or signalled
    started: bool = False  # supervisord, or the programs, started again
    kept: bool = True  # the record is still there (False: a private temp file, removed)
    keep_record: bool = False  # a later `kill` or `requeue` of it may be needed
    cause: str | None = None  # the error behind a problem, when it is not the problem itself
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        return "; ".join(self.problems) or None

    @property
    def exit_code(self) -> int:
        if self.problem is None:
            return EXIT_OK
        return EXIT_PARTIAL if self.changed else EXIT_ERROR

    @property
    def total(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def left_to_resend(self) -> list[TaskFate]:
        return [t for t in self.tasks if t.left]

    @property
    def requeue_command(self) -> str | None:
        """How to re-send what is left, when something is."""
        if not self.left_to_resend or not self.kept:
            return None
        return shlex.join(["celery-supervise", "-A", self.app_spec, "requeue", self.state_file])

    def to_document(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "dry_run": self.dry_run,
            "shutdown": self.shutdown,
            "phases": [{"name": p.name, "seconds": round(p.seconds, 3), "detail": p.detail} for p in self.phases],
            "total": round(self.total, 3),
            "supervisord": {"old_pid": self.old_supervisord, "new_pid": self.new_supervisord},
            "processes": self.processes,
            "save": None if self.save is None else report.save_summary(self.save),
            "kill": None if self.kill is None else report.kill_document(self.kill),
            "tasks": [{"id": t.id, "name": t.name, "node": t.node, "fate": t.fate, "reason": t.reason,
                       "action": t.action, "left_to_resend": t.left} for t in self.tasks],
            "requeue": None if self.requeue is None or self.requeue.dry_run else report.requeue_document(self.requeue),
            "requeue_command": self.requeue_command,
            "new_nodes": {n: None if s is None else round(s, 3) for n, s in self.new_nodes.items()},
            "state_file": self.state_file if self.kept else None,
            "problem": self.problem,
            "cause": self.cause,
            "warnings": self.warnings,
        }


def fate_of(outcome: operations.RequeueOutcome) -> TaskFate:
    """One recorded task's fate, from requeue's decision about it (see :mod:`celery_supervise.requeue`)."""
    d = outcome.decision
    reason = d.reason
    if reason.startswith("finished (journal"):
        fate = FINISHED
    elif reason in (requeuing.NO_JOURNAL, requeuing.NOT_IN_JOURNAL):
        fate = UNKNOWN
    elif reason in (requeuing.REDELIVERED, requeuing.BACK_IN_QUEUE):
        fate = REDELIVERED
    elif reason in (requeuing.ALREADY_REQUEUED, requeuing.DUPLICATE):
        fate = ALREADY
    elif reason.startswith("cannot be re-sent"):
        fate = CANNOT
    else:  # interrupted, terminated, or its unacknowledged message lost with the worker
        fate = CUT_OFF
    return TaskFate(d.task.id, d.task.name, d.recorded.node, fate, outcome.reason, outcome.status)


def fates(result: operations.RequeueResult) -> list[TaskFate]:
    return [fate_of(o) for o in result.outcomes]


# ---------------------------------------------------------------------- act


class Progress:
    """What a deploy says while it runs (stderr); this one says nothing."""

    def step(self, number: int, total: int, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def waiting(self, what: str, elapsed: float, timeout: float | None) -> None:
        pass


def run_supervisord(executable: str, conf: str, timeout: float) -> None:
    """``supervisord -c CONF``, returning once it has daemonized (its first process exits 0).

    Its output goes to a temporary file, not a pipe: a supervisord that
    stayed in the foreground would otherwise die of a closed pipe.
    """
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen([executable, "-c", conf], stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT)
        except OSError as exc:
            raise SupervisorError(conf, f"cannot run {executable}: {exc.strerror or exc}") from None
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise SupervisorError(conf, f"`supervisord -c {conf}` has not returned after {timeout:g}s "
                                  "(does it stay in the foreground?)") from None
        if code != 0:
            output.seek(0)
            lines = output.read().decode(errors="replace").strip().splitlines()
            raise SupervisorError(conf, f"`supervisord -c {conf}` exited with {code}"
                                  + (f": {lines[-1]}" if lines else ""))


@dataclass
class _Run:
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


def deploy(
    plan_: Plan,
    *,
    load_app: Callable[[], object],
    progress: Progress = Progress(),
    on_wait: Callable | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    start_supervisord: Callable[[str], None] | None = None,
    remote_factory: Callable = control.Remote,
) -> DeployResult:
    """Carry out *plan_*; see the module's docstring for the phases.

    Errors before anything is stopped return a result with ``problem`` set
    and ``changed`` false (exit 1); errors after set ``problem`` with
    ``changed`` true (exit 3), and the record is kept. *load_app* loads the
    Celery app (once, in the savepid step); *start_supervisord(conf)* starts
    supervisord again; *on_wait* is the kill's progress callback.
    """
    o = plan_.options
    scratch = None
    path = o.state
    if path is None:
        scratch = tempfile.mkdtemp(prefix="celery-supervise-deploy-")  # 0700: nobody else can swap the record
        path = os.path.join(scratch, "state.json")
    if start_supervisord is None:
        executable = plan_.supervisord or "supervisord"
        start_supervisord = lambda conf: run_supervisord(executable, conf, o.start_timeout)  # noqa: E731
    result = DeployResult(shutdown=o.shutdown, dry_run=o.dry_run, state_file=path, app_spec=o.app_spec)
    run = _Run(plan_, result, progress, load_app, on_wait, clock, sleep, start_supervisord, remote_factory)
    try:
        if o.shutdown:
            _deploy_with_shutdown(run)
        else:
            _deploy_without_shutdown(run)
    except SuperviseError as exc:
        if not result.changed:
            result.problems.append(str(exc))
        else:
            result.keep_record = True
            again = "started again" if result.started else "not started again"
            result.problems.append(f"{exc} (after the stop: {again}; the record is kept in {path})")
    except BaseException:
        result.keep_record = result.changed
        raise
    finally:
        # A private record goes once nothing needs it: it stays while tasks
        # are left to re-send, a leftover survived, or a deploy stopped short.
        keep = scratch is None or (not result.dry_run and (
            result.keep_record or bool(result.left_to_resend) or (result.kill is not None and result.kill.partial)))
        if not keep:
            result.kept = False
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def _failed_before_the_stop(run: _Run, cause: str) -> None:
    run.result.cause = cause
    run.result.problems.append("savepid failed; nothing was stopped")


def _load_app(run: _Run) -> bool:
    if run.app is not None:
        return True
    try:
        run.app = run.load_app()
    except SuperviseError as exc:
        _failed_before_the_stop(run, str(exc))
        return False
    return True


def _record(run: _Run, supervisor_url: str | None, names: list[str]) -> bool:
    """savepid; ``False`` (and the result says why) when it failed: nothing is stopped then."""
    o, result = run.options, run.result
    t = run.clock()
    if not _load_app(run):
        return False
    try:
        targets = operations.Targets(
            app=run.app, app_spec=o.app_spec, supervisor_url=supervisor_url, programs=tuple(names),
            timeout=o.reply_timeout, supervisor_auth=(run.plan.server.username, run.plan.server.password))
        result.save = saved = operations.savepid(result.state_file, targets, Policy())
    except SuperviseError as exc:
        _failed_before_the_stop(run, str(exc))
        return False
    result.warnings += [w for w in saved.warnings if not (saved.broker_error and w.startswith(saved.broker_error))]
    if saved.broker_error:  # savepid's exit 3: the record lacks the tasks a stop would cut off
        _failed_before_the_stop(run, report.save_problem(saved))
        return False
    snap = saved.snapshot
    run.phase(SAVEPID, t, f"{len(snap.workers)} worker(s), {sum(len(w.procs) for w in snap.workers)} process(es), "
              f"{sum(len(w.tasks) for w in snap.workers)} active task(s)")
    return True


def _dry_run(run: _Run, after: str) -> None:
    run.progress.note(f"dry run: this is what kill would do after {after}")
    t = run.clock()
    run.result.kill = operations.kill(run.result.state_file, grace=run.options.grace, dry_run=True,
                                      app_spec=run.options.app_spec)
    run.phase(KILL, t, "dry run: " + report.summary_line(run.result.kill))
    run.result.tasks = [TaskFate(task.id, task.name, w.node, RUNNING, "running at savepid: a stop may cut it off")
                        for w in run.result.save.snapshot.workers for task in w.tasks]


def _kill(run: _Run) -> None:
    o, result = run.options, run.result
    run.step(f"killing what the workers left behind (grace {o.grace:g}s)")
    t = run.clock()
    result.kill = killed = operations.kill(result.state_file, grace=o.grace, app_spec=o.app_spec, on_wait=run.on_wait)
    result.warnings += killed.warnings
    run.phase(KILL, t, report.summary_line(killed))
    if killed.partial:  # the workers are started all the same: a worker down is worse than a stray process
        result.problems.append(f"some leftovers of the old workers could not be killed (see the kill report); "
                               f"`celery-supervise kill {result.state_file}` tries again")


def _tasks(run: _Run) -> None:
    """requeue, or its dry run for the decisions alone: which recorded tasks did not finish.

    A requeue that fails does not keep the workers from starting again; it
    keeps the record, and the summary says how to re-send.
    """
    o, result = run.options, run.result
    if o.requeue:
        run.step("re-sending the tasks the stop cut off")
    t = run.clock()
    try:
        result.requeue = rq = operations.requeue(result.state_file, run.app, journal_dir=o.journal,
                                                 dry_run=not o.requeue)
    except SuperviseError as exc:
        result.tasks = [TaskFate(task.id, task.name, w.node, UNKNOWN, f"unknown: {exc}", operations.WOULD_RESEND)
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
        run.phase(REQUEUE, t, report.requeue_summary(rq))
        if rq.partial:
            result.problems.append(f"the broker failed during requeue ({report.requeue_summary(rq)}); "
                                   "run requeue again to send the rest")


def _wait_ready(run: _Run, nodes: Callable[[], list[str]], expected: int, started_at: float) -> None:
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


def running_supervisord(server: rpc.Server) -> procs.Proc | None:
    """The supervisord answering at *server*, as a local process; ``None`` if nobody answers there.

    Refused: a supervisord whose PID is no supervisord here (another PID
    namespace: its exit could not be watched, and its workers' PIDs mean
    something else here), and one that is PID 1 (its exit would end the
    container).
    """
    try:
        pid = int(server.proxy().supervisor.getPID())
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # no socket, nobody listening: not running
    except (OSError, xmlrpc.client.Error, http.client.HTTPException, ValueError) as exc:
        raise SupervisorError(server.url, f"did not answer getPID ({' '.join(str(exc).split())})") from None
    if pid == 1:
        raise SupervisorError(server.url, "is PID 1 here: its shutdown would end the container; "
                              "use --no-shutdown to restart its worker programs instead")
    proc = procs.read_proc(pid)
    if proc is None or not procs.runs_supervisord(proc.cmdline):
        raise SupervisorError(server.url, f"says it is PID {pid}, which is no supervisord on this host (another "
                              "PID namespace?): run deploy where supervisord runs, or use --no-shutdown")
    return proc


def _worker_programs(run: _Run, infos: list[dict]) -> list[str]:
    """supervisord's processes that run a worker of -A APP from this project (and match --program)."""
    app_spec = run.options.app_spec
    local = discovery.scan(app_spec, discovery.app_root(app_spec))
    return [p.name for p in rpc.running_processes(infos, run.options.programs)
            if discovery.workers_under(p.pid, local)]


def _deploy_with_shutdown(run: _Run) -> None:
    o, result, server = run.options, run.result, run.plan.server
    sup = running_supervisord(server)
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
        return operations.worker_nodes([p.pid for p in rpc.running_processes(infos, o.programs)], o.app_spec)

    _wait_ready(run, nodes, len(result.save.snapshot.workers), started_at)
    if result.problem is None:
        run.progress.note(f"done: supervisord is running (PID {new})"
                          + (f", {len(result.new_nodes)} worker(s) answered a ping" if result.new_nodes else ""))


def _wait_exit(run: _Run, sup: procs.Proc) -> bool:
    """Poll until supervisord has exited (a zombie has); ``False`` after --shutdown-timeout."""
    timeout = run.options.shutdown_timeout
    started = run.clock()
    while True:
        current = procs.live_identity(sup.pid)  # None for a zombie: exited, not yet collected
        if current is None or not sup.same_process(current):
            return True
        elapsed = run.clock() - started
        if elapsed >= timeout:
            return False
        run.progress.waiting("for supervisord to exit", elapsed, timeout)
        run.sleep(POLL_INTERVAL)


def _wait_answer(run: _Run, server: rpc.Server, deadline: float, old_pid: int | None) -> int:
    """The PID of the new supervisord, once it answers at *server*."""
    while True:
        try:
            pid = int(server.proxy().supervisor.getPID())
            if pid != old_pid:
                return pid
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            pass  # not listening yet
        if run.clock() >= deadline:
            raise SupervisorError(server.url, f"did not answer within {run.options.start_timeout:g}s of "
                                  f"`supervisord -c {run.options.configuration}`")
        run.sleep(POLL_INTERVAL)


# --------------------------------------------------------- without shutdown


def _deploy_without_shutdown(run: _Run) -> None:
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
    stopped = operations.side_by_side(
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
    pids = dict(zip(names, operations.side_by_side(rpc.start_process, server, names)))
    result.started = True
    run.phase(START, t, ", ".join(f"{name} PID {pid}" for name, pid in pids.items()))
    _wait_ready(run, lambda: operations.worker_nodes(pids.values(), o.app_spec),
                len(result.save.snapshot.workers), started_at)
    if result.problem is None:
        run.progress.note(f"done: {', '.join(names)} running again under supervisord (PID {result.old_supervisord})"
                          + (f", {len(result.new_nodes)} worker(s) answered a ping" if result.new_nodes else ""))


__all__ = ["Options", "Plan", "DeployResult", "TaskFate", "Progress", "plan", "deploy", "fates", "fate_of",
           "run_supervisord", "check_config", "running_supervisord", "LOG_NAME", "LOG_NAME_ENV"]
