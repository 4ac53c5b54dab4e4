"""``celery-supervise -A APP deploy``: restart supervisord's Celery workers for a deploy, leaving nothing behind.

Two ways, chosen with ``--no-shutdown``:

* **shutdown** (the default; what ``scripts/deploy.sh`` has always done):
  savepid -> ``supervisorctl shutdown`` -> wait for supervisord to exit ->
  kill -> [requeue] -> ``supervisord -c CONF`` -> ready;
* **no shutdown** (containers, where supervisord is PID 1 and its exit
  ends the container): savepid -> ``stopProcess`` of the worker programs,
  side by side -> kill -> [requeue] -> ``startProcess`` of the same -> ready.

Each step is the tool's own: :func:`celery_supervise.commands.savepid.savepid`,
:func:`~celery_supervise.commands.kill.kill` and
:func:`~celery_supervise.commands.requeue.requeue` (with ``dry_run`` when
``--requeue`` is not given, for its decisions alone), and the ping wait of
``restart``. Plan, then act: :func:`plan` checks every option and what it
can of the surroundings (the config supervisord will be started with, the
executable), changing nothing; :func:`deploy` carries the plan out. Its
seams are the clock, the supervisord starter, the broker remote and the
Celery app loader; supervisord itself is reached through the plan's
:class:`~celery_supervise.supervisord.rpc.Server`.

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

import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import options
from ..celery_side import control, requeue as requeuing
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, StateFileError, SuperviseError, SupervisorError, UsageError
from ..processes.kill import KillReport
from ..supervisord import daemon, rpc
from . import kill as kill_verb, requeue as requeue_verb, savepid as savepid_verb
from .restart import Phase

DEFAULT_SHUTDOWN_TIMEOUT = options.SHUTDOWN_TIMEOUT
DEFAULT_START_TIMEOUT = options.START_TIMEOUT
#: Progress and error lines on stderr start with this variable's value (scripts/deploy.sh sets its own name).
LOG_NAME_ENV = "CELERY_SUPERVISE_LOG_NAME"
LOG_NAME = "celery-supervise deploy"
#: How often the wait for supervisord's exit (or answer) looks.
POLL_INTERVAL = daemon.POLL_INTERVAL

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
    grace: float = kill_verb.DEFAULT_GRACE
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    start_timeout: float = DEFAULT_START_TIMEOUT
    reply_timeout: float = savepid_verb.DEFAULT_TIMEOUT
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
        supervisord = daemon.find_supervisord(which)
        daemon.check_config(o.configuration)
    if o.shutdown and not o.configuration and not o.supervisor_url:
        raise UsageError("deploy needs -c CONF or --supervisor-url to reach the supervisord it shuts down")
    return Plan(o, find_server(o.supervisor_url, o.configuration), supervisord)


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
        return self.action in (requeue_verb.WOULD_RESEND, requeue_verb.FAILED)


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
    save: savepid_verb.SaveResult | None = None
    kill: KillReport | None = None
    requeue: requeue_verb.RequeueResult | None = None  # the real one with --requeue, else its dry run
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
            "save": None if self.save is None else self.save.summary(),
            "kill": None if self.kill is None else self.kill.to_document(),
            "tasks": [{"id": t.id, "name": t.name, "node": t.node, "fate": t.fate, "reason": t.reason,
                       "action": t.action, "left_to_resend": t.left} for t in self.tasks],
            "requeue": None if self.requeue is None or self.requeue.dry_run else self.requeue.to_document(),
            "requeue_command": self.requeue_command,
            "new_nodes": {n: None if s is None else round(s, 3) for n, s in self.new_nodes.items()},
            "state_file": self.state_file if self.kept else None,
            "problem": self.problem,
            "cause": self.cause,
            "warnings": self.warnings,
        }


def fate_of(outcome: requeue_verb.RequeueOutcome) -> TaskFate:
    """One recorded task's fate, from requeue's decision about it (see :mod:`celery_supervise.celery_side.requeue`)."""
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


def fates(result: requeue_verb.RequeueResult) -> list[TaskFate]:
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
    from . import deploy_steps as steps  # the steps import this module's results: loaded once it is

    o = plan_.options
    scratch = None
    path = o.state
    if path is None:
        scratch = tempfile.mkdtemp(prefix="celery-supervise-deploy-")  # 0700: nobody else can swap the record
        path = os.path.join(scratch, "state.json")
    if start_supervisord is None:
        executable = plan_.supervisord or "supervisord"
        start_supervisord = lambda conf: daemon.run_supervisord(executable, conf, o.start_timeout)  # noqa: E731
    result = DeployResult(shutdown=o.shutdown, dry_run=o.dry_run, state_file=path, app_spec=o.app_spec)
    run = steps.Run(plan_, result, progress, load_app, on_wait, clock, sleep, start_supervisord, remote_factory)
    try:
        if o.shutdown:
            steps.with_shutdown(run)
        else:
            steps.without_shutdown(run)
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


# What the deploy needs of supervisord itself, under the names it has always had here.
check_config = daemon.check_config
run_supervisord = daemon.run_supervisord
running_supervisord = daemon.running_supervisord

__all__ = ["Options", "Plan", "DeployResult", "TaskFate", "Progress", "plan", "deploy", "fates", "fate_of",
           "run_supervisord", "check_config", "running_supervisord", "LOG_NAME", "LOG_NAME_ENV"]
