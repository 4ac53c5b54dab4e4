"""The ``celery-supervise`` command line: a thin typer shell over the core.

Each command parses its options, calls one function of
:mod:`celery_supervise.operations`, and renders the result with
:mod:`celery_supervise.report`. Errors become exit codes in :func:`run`,
and nowhere else.

This typer app is the one table of commands and options: the Django
command builds its parser from :func:`command_tree` and runs the very same
click commands through :func:`invoke`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, List, Optional

import typer

from . import __version__, operations, report, restart as restarting
from .control import load_app
from .errors import (
    EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, Outcome, SuperviseError, UsageError, exit_code_help,
)
from .plan import Policy

# Newer typer vendors its own click, older typer re-exports click's; both
# keep click's class names, so find them from the public BadParameter.
_CLICK = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickUsageError = _CLICK["UsageError"]
ClickException = _CLICK["ClickException"]

PROG = "celery-supervise"

app = typer.Typer(
    name=PROG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make supervisord stop Celery workers properly: record each worker's process tree, "
    "then kill the whole Celery tree and spare what tasks deliberately detached.",
)

# Options shared by several commands, defined once.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be signalled; signal nothing.")]
JournalOpt = Annotated[
    Optional[str],
    typer.Option("--journal", metavar="DIR",
                 help="The workers' task journal. [default: the one the app installs or its supervise_journal setting names]"),
]
SpareOpt = Annotated[
    Optional[str],
    typer.Option("--spare", metavar="RULES",
                 help="Comma list of setsid, nohup, pgroup, or none. [default: setsid,nohup; "
                 "kill: the policy recorded by savepid]"),
]
ReplyTimeoutOpt = Annotated[
    float, typer.Option("--reply-timeout", metavar="SECONDS", min=0.05, help="Seconds to wait for each broker reply.")
]
DrainTimeoutOpt = Annotated[
    float, typer.Option("--drain-timeout", metavar="SECONDS", min=0.1,
                        help="Seconds the workers may take, in all, to finish their running tasks.")
]
# The old spelling of --reply-timeout (savepid, status, restart) and of
# --drain-timeout (drain): it keeps its old meaning, see renamed().
OldTimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", min=0.05, hidden=True)]
GraceOpt = Annotated[
    float, typer.Option("--grace", metavar="SECONDS", min=0, help="Seconds between SIGTERM and SIGKILL.")
]
SupervisorUrlOpt = Annotated[
    Optional[str],
    typer.Option("--supervisor-url", metavar="URL", envvar="SUPERVISOR_SERVER_URL",
                 help="supervisord's XML-RPC URL, e.g. unix:///run/supervisor.sock or http://127.0.0.1:9001."),
]
CgroupsOpt = Annotated[
    str, typer.Option("--cgroups", metavar="auto|off",
                      help="auto: also track each worker's cgroup (v2), where it has one, for children that left "
                      "its tree and process group; off: the tree and the process group only.")
]
ProgramOpt = Annotated[
    Optional[List[str]],
    typer.Option("--program", metavar="GLOB", help="supervisord program(s) running the workers (repeatable)."),
]


class State:
    def __init__(self, app_spec: str | None):
        self.app_spec = app_spec
        self._app = None

    def targets(self, supervisor_url, programs, timeout, cgroups: str = "auto") -> operations.Targets:
        return operations.Targets(app=self.celery_app(), app_spec=self.app_spec, supervisor_url=supervisor_url,
                                  programs=tuple(programs or ()), timeout=timeout, cgroups=cgroup_mode(cgroups))

    def celery_app(self):
        if self.app_spec and self._app is None:
            self._app = load_app(self.app_spec)
        return self._app


def consoles():
    return report.consoles()


def cgroup_mode(value: str) -> str:
    from . import cgroups

    if value not in cgroups.MODES:
        raise UsageError(f"--cgroups: {value!r} is not one of {', '.join(cgroups.MODES)}")
    return value


def renamed(ctx: typer.Context, old: str, new: str):
    """The value of option *new*, whose deprecated spelling *old* still works.

    The old spelling prints one note on stderr naming the new one; giving
    both is a usage error, since they would disagree.
    """
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    value = ctx.params[old]
    if value is None:
        return ctx.params[new]
    if ctx.get_parameter_source(new).name != "DEFAULT":
        raise UsageError(f"{flags[old]} is the old name of {flags[new]}; give only {flags[new]}")
    typer.echo(f"{ctx.find_root().info_name}: warning: {flags[old]} is deprecated; use {flags[new]} "
               "(same meaning)", err=True)
    return value


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    app_spec: Annotated[
        Optional[str],
        typer.Option("-A", "--app", metavar="APP", envvar="CELERY_APP",
                     help="Your Celery app, as for `celery -A` (module or module:attribute)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=show_version, help="Print the version and exit."),
    ] = False,
):
    ctx.obj = State(app_spec)


@app.command()
def savepid(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="State file to write (atomically, mode 0600).")],
    supervisor_url: SupervisorUrlOpt = None,
    program: ProgramOpt = None,
    spare: SpareOpt = None,
    reply_timeout: ReplyTimeoutOpt = operations.DEFAULT_TIMEOUT,
    timeout: OldTimeoutOpt = None,
    as_json: JsonOpt = False,
    cgroups: CgroupsOpt = "auto",
) -> int:
    """Record this host's worker trees and active tasks (run before the stop)."""
    state: State = ctx.obj
    policy = Policy.parse(spare)
    reply_timeout = renamed(ctx, "timeout", "reply_timeout")
    result = operations.savepid(file, state.targets(supervisor_url, program, reply_timeout, cgroups), policy)
    out, err = consoles()
    return report.render_save(out, err, result, as_json)


@app.command()
def kill(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="State file written by savepid (or the old bare PID list).")],
    grace: GraceOpt = operations.DEFAULT_GRACE,
    spare: SpareOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    cgroups: CgroupsOpt = "auto",
) -> int:
    """Kill the recorded Celery trees, sparing detached descendants (run after the stop)."""
    state: State = ctx.obj
    policy = Policy.parse(spare) if spare is not None else None
    mode = cgroup_mode(cgroups)
    out, err = consoles()
    progress = report.WaitProgress(err)
    try:
        result = operations.kill(file, policy=policy, grace=grace, dry_run=dry_run,
                                 app_spec=state.app_spec, on_wait=progress, cgroup_mode=mode)
    finally:
        progress.close()
    return report.render_kill(out, err, result, as_json)


@app.command()
def status(
    ctx: typer.Context,
    supervisor_url: SupervisorUrlOpt = None,
    program: ProgramOpt = None,
    spare: SpareOpt = None,
    reply_timeout: ReplyTimeoutOpt = operations.DEFAULT_TIMEOUT,
    timeout: OldTimeoutOpt = None,
    as_json: JsonOpt = False,
    cgroups: CgroupsOpt = "auto",
) -> int:
    """Draw the live worker trees with each verdict; change nothing."""
    state: State = ctx.obj
    policy = Policy.parse(spare)  # before any slow discovery, so a typo fails at once
    reply_timeout = renamed(ctx, "timeout", "reply_timeout")
    result = operations.status(state.targets(supervisor_url, program, reply_timeout, cgroups), policy)
    out, err = consoles()
    return report.render_status(out, err, result, as_json)


@app.command()
def drain(
    ctx: typer.Context,
    destination: Annotated[
        Optional[List[str]],
        typer.Option("--destination", "-d", metavar="NODE",
                     help="Drain this worker node, e.g. demo@host (repeatable). [default: this host's workers of -A APP]"),
    ] = None,
    all_workers: Annotated[bool, typer.Option("--all", help="Drain every worker that answers on the app's broker.")] = False,
    drain_timeout: DrainTimeoutOpt = operations.DEFAULT_DRAIN_TIMEOUT,
    timeout: Annotated[Optional[float], typer.Option("--timeout", min=0.1, hidden=True)] = None,
    as_json: JsonOpt = False,
) -> int:
    """Stop workers taking new tasks and wait until their running ones finish (exit 3 on timeout)."""
    state: State = ctx.obj
    timeout = renamed(ctx, "timeout", "drain_timeout")
    out, err = consoles()
    progress = report.DrainProgress(err)
    try:
        result = operations.drain(state.celery_app(), state.app_spec, destinations=destination or (),
                                  all_workers=all_workers, timeout=timeout, on_progress=progress)
    finally:
        progress.close()
    return report.render_drain(out, err, result, as_json)


@app.command()
def requeue(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="State file written by savepid before the stop.")],
    journal: JournalOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be re-sent; send nothing.")] = False,
    as_json: JsonOpt = False,
) -> int:
    """Re-send the recorded tasks the stop cut off, once (run after the stop)."""
    state: State = ctx.obj
    result = operations.requeue(file, state.celery_app(), journal_dir=journal, dry_run=dry_run)
    out, err = consoles()
    return report.render_requeue(out, err, result, as_json)


@app.command()
def restart(
    ctx: typer.Context,
    programs: Annotated[List[str], typer.Argument(metavar="PROGRAM...",
                                                  help="supervisord program or process names: NAME, GROUP:NAME, GROUP:*.")],
    drain_timeout: DrainTimeoutOpt = operations.DEFAULT_DRAIN_TIMEOUT,
    grace: GraceOpt = operations.DEFAULT_GRACE,
    start_timeout: Annotated[
        float, typer.Option("--start-timeout", metavar="SECONDS", min=0.1,
                            help="Seconds the new workers may take to answer a ping.")
    ] = restarting.DEFAULT_START_TIMEOUT,
    supervisor_url: SupervisorUrlOpt = None,
    configuration: Annotated[
        Optional[str],
        typer.Option("-c", "--configuration", metavar="SUPERVISORD_CONF",
                     help="Read supervisord's URL and credentials from this file's [supervisorctl] section, "
                     "as supervisorctl -c does. [default: supervisorctl's search]"),
    ] = None,
    state: Annotated[
        Optional[str], typer.Option("--state", metavar="FILE", help="Keep the savepid record here. [default: a temporary file]")
    ] = None,
    reply_timeout: ReplyTimeoutOpt = operations.DEFAULT_TIMEOUT,
    timeout: OldTimeoutOpt = None,
    as_json: JsonOpt = False,
) -> int:
    """Restart supervisord programs running Celery workers: savepid, drain, stop, kill, start, wait for a ping."""
    from . import rpc

    state_: State = ctx.obj
    reply_timeout = renamed(ctx, "timeout", "reply_timeout")
    server = rpc.find_server(supervisor_url, configuration)
    out, err = consoles()
    drain_progress, wait_progress = report.DrainProgress(err), report.WaitProgress(err)
    try:
        result = operations.restart(
            state_.celery_app(), state_.app_spec, programs, server, state_path=state, drain_timeout=drain_timeout,
            grace=grace, start_timeout=start_timeout, timeout=reply_timeout, on_drain=drain_progress,
            on_wait=wait_progress,
        )
    finally:
        drain_progress.close()
        wait_progress.close()
    return Outcome(report.render_restart(out, err, result, as_json), result.problem)


@app.command()
def deploy(
    ctx: typer.Context,
    configuration: Annotated[
        Optional[str],
        typer.Option("-c", "--configuration", metavar="SUPERVISORD_CONF", envvar="SUPERVISORD_CONF",
                     help="supervisord's config: `supervisord -c` starts it again, and its [supervisorctl] section "
                     "says where it listens. [default: supervisorctl's search, with --no-shutdown]"),
    ] = None,
    supervisor_url: SupervisorUrlOpt = None,
    program: ProgramOpt = None,
    state: Annotated[
        Optional[str],
        typer.Option("--state", metavar="FILE", help="Keep the savepid record here. [default: a private temporary "
                     "file, kept (and printed) when tasks are left to re-send or something went wrong]"),
    ] = None,
    grace: GraceOpt = operations.DEFAULT_GRACE,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", min=0.1, metavar="SECONDS",
                            help="How long supervisord may take to shut down.")
    ] = 120.0,
    start_timeout: Annotated[
        float, typer.Option("--start-timeout", min=0.1, metavar="SECONDS",
                            help="How long supervisord and the new workers may take to answer.")
    ] = restarting.DEFAULT_START_TIMEOUT,
    reply_timeout: ReplyTimeoutOpt = operations.DEFAULT_TIMEOUT,
    no_shutdown: Annotated[
        bool, typer.Option("--no-shutdown", help="Keep supervisord running (in a container it is PID 1): stop, "
                           "clean up and start its worker programs only.")
    ] = False,
    no_start: Annotated[bool, typer.Option("--no-start", help="Do not start supervisord (or the programs) again.")] = False,
    requeue: Annotated[bool, typer.Option("--requeue", help="Re-send the tasks the stop cut off (after the kill).")] = False,
    journal: JournalOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Restart the workers for a deploy: savepid, supervisorctl shutdown, kill, supervisord (exit 0/1/2/3)."""
    from .commands import deploy as deploying

    state_: State = ctx.obj
    plan = deploying.plan(deploying.Options(
        app_spec=state_.app_spec, configuration=configuration, supervisor_url=supervisor_url, state=state,
        grace=grace, shutdown_timeout=shutdown_timeout, start_timeout=start_timeout, reply_timeout=reply_timeout,
        start=not no_start, dry_run=dry_run, requeue=requeue, journal=journal, shutdown=not no_shutdown,
        programs=tuple(program or ()),
    ))
    out, err = consoles()
    name = os.environ.get(deploying.LOG_NAME_ENV) or deploying.LOG_NAME
    kill_progress = report.WaitProgress(err)
    try:
        result = deploying.deploy(plan, load_app=state_.celery_app, progress=report.DeployProgress(err, name),
                                  on_wait=kill_progress)
    finally:
        kill_progress.close()
    return Outcome(report.render_deploy(out, err, result, as_json, name), result.problem)


@app.command("print-config")
def print_config(
    ctx: typer.Context,
    program: Annotated[
        Optional[str], typer.Option("--program", metavar="NAME",
                                    help="The worker's supervisord program name. [default: APP-worker]"),
    ] = None,
    command: Annotated[
        Optional[str],
        typer.Option("--command", metavar="CMD",
                     help="The worker's command line. [default: the celery beside this tool's Python, "
                     "-A APP worker -l info -n NAME@%h]"),
    ] = None,
    directory: Annotated[
        Optional[str], typer.Option("--directory", metavar="DIR",
                                    help="Where -A APP is importable. [default: the current folder]"),
    ] = None,
    user: Annotated[Optional[str], typer.Option("--user", metavar="USER", help="Run the worker and the listener as USER.")] = None,
    numprocs: Annotated[int, typer.Option("--numprocs", metavar="N", min=1, help="How many worker processes.")] = 1,
    state_dir: Annotated[
        Optional[str], typer.Option("--state-dir", metavar="DIR",
                                    help="The listener's records. [default: /var/lib/celery-supervise/NAME]"),
    ] = None,
    log_dir: Annotated[
        Optional[str], typer.Option("--log-dir", metavar="DIR",
                                    help="Write the worker's and the listener's logs here. [default: supervisord's childlogdir]"),
    ] = None,
    contain: Annotated[bool, typer.Option("--contain", help="Run the worker through `celery-supervise contain --`: "
                                          "a cgroup of its own from its first instruction.")] = False,
    as_json: JsonOpt = False,
) -> int:
    """Print a conf.d snippet for your supervisord: the worker's [program:] and the eventlistener."""
    from .commands import print_config as printing

    request = printing.Request(app=ctx.obj.app_spec, program=program, command=command, directory=directory,
                               user=user, numprocs=numprocs, state_dir=state_dir, log_dir=log_dir,
                               contain=contain)
    result = printing.print_config(request)
    out, err = consoles()
    return report.render_print_config(out, err, result, as_json)


@app.command()
def listener(
    ctx: typer.Context,
    state_dir: Annotated[str, typer.Option("--state-dir", metavar="DIR",
                                           help="Where worker records and kill reports are kept (mode 0700).")],
    program: ProgramOpt = None,
    grace: GraceOpt = operations.DEFAULT_GRACE,
    spare: SpareOpt = None,
    cgroups: CgroupsOpt = "auto",
) -> int:
    """Run as a supervisord eventlistener: snapshot on start/stop, reap after every stop."""
    from . import listener as listening, statefile

    state: State = ctx.obj
    policy = Policy.parse(spare)
    mode = cgroup_mode(cgroups)
    supervisor, rpc = listening.from_environment(dict(os.environ))
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    # Every record there would be refused, and no worker ever reaped: say so at once.
    statefile.check_folder(os.path.join(state_dir, "celery-worker@1.json"))
    return listening.Listener(
        state_dir=state_dir, programs=program or [], grace=grace, policy=policy,
        app=state.celery_app(), app_spec=state.app_spec, supervisor=supervisor, rpc=rpc, cgroup_mode=mode,
    ).run()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def contain(
    command: Annotated[List[str], typer.Argument(metavar="-- CMD...", help="The worker's command line.")],
    cgroups: CgroupsOpt = "auto",
) -> int:
    """Enter a cgroup of its own, then exec CMD (put it in front of the worker's command)."""
    from .commands import contain as containing

    containing.contain(command, cgroup_mode(cgroups))
    return 0


def command_tree():
    """The click command tree of the CLI: each command's ``--help`` ends with its exit codes.

    The codes come from :data:`celery_supervise.errors.EXIT_CODES`, so a
    command added to :data:`app` gets its paragraph with no more code.
    """
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        command.epilog = command.epilog or exit_code_help(name)
    return group


def invoke(argv: list[str] | None = None, prog_name: str = PROG) -> int:
    """Run the command line *argv* and return its exit code; errors propagate.

    The exit code is an :class:`~celery_supervise.errors.Outcome` when the
    command knows why it stopped short. Not standalone: click raises its
    errors here instead of exiting, so each shell translates them once.
    Shell completion still works: click answers the completion
    environment variable and exits before parsing anything.
    """
    rv = command_tree().main(args=argv, prog_name=prog_name, standalone_mode=False)
    return rv if isinstance(rv, int) else 0


def one_line(exc: BaseException) -> tuple[int, str, str] | None:
    """``(exit code, kind, message)`` for an error the CLI expects; None for a bug.

    The kind is ``usage``, ``error`` or ``interrupted``; the message is
    empty when there is nothing to add (``--help`` was shown, ``--version``).
    """
    if isinstance(exc, typer.Exit):
        return exc.exit_code, "", ""
    if isinstance(exc, ClickUsageError):  # an empty message: no_args_is_help has shown the help
        message = " ".join(exc.format_message().split())
        return EXIT_USAGE, "usage", f"{message} (see --help)" if message else ""
    if isinstance(exc, ClickException):
        return EXIT_ERROR, "error", " ".join(exc.format_message().split())
    if isinstance(exc, (typer.Abort, KeyboardInterrupt)):
        return EXIT_INTERRUPTED, "interrupted", ""
    if isinstance(exc, SuperviseError):
        return exc.exit_code, "usage" if exc.exit_code == EXIT_USAGE else "error", str(exc)
    return None


def internal_error(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every error becomes one line on stderr."""
    try:
        return int(invoke(argv))
    except (Exception, KeyboardInterrupt) as exc:  # translated here, and nowhere else
        known = one_line(exc)
        if known is None:  # a bug, or a library failing in a way we did not foresee
            if os.environ.get("CELERY_SUPERVISE_DEBUG"):
                raise
            print(f"{PROG}: {internal_error(exc)} (set CELERY_SUPERVISE_DEBUG=1 for a traceback)", file=sys.stderr)
            return EXIT_ERROR
    code, kind, message = known
    if kind == "interrupted":
        print(f"{PROG}: interrupted", file=sys.stderr)
    elif message:
        print(f"{PROG}: {kind}: {message}", file=sys.stderr)
    return code


def main() -> None:
    # Our own warnings, but not kombu's and Celery's chatter ("No hostname
    # was supplied") on every broker connection.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format=f"{PROG}: %(message)s")
    logging.getLogger("celery_supervise").setLevel(logging.WARNING)
    sys.exit(run())
