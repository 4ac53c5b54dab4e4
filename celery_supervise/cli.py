"""The ``celery-supervise`` command line: a thin typer shell over the core.

Each command parses its options, calls its verb's module in
:mod:`celery_supervise.commands`, and renders the result with
:mod:`celery_supervise.render`. savepid, status, kill and the listener
do so through their shells in :mod:`celery_supervise.entry`, which the
console script's typer-free fast path runs too. Errors become exit codes
in :func:`run`, and nowhere else.

This typer app is the one table of commands; their options are rows of
:mod:`celery_supervise.options` (``opt("grace")``), declared once. The
Django command builds its parser from :func:`command_tree` and runs the
very same click commands through :func:`invoke`.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, List, Optional

import typer

from . import __version__, entry, options, render
from .commands import drain as draining, requeue as requeuing, restart as restarting
# State, internal_error and say are part of this module's API too (the Django command uses them).
from .entry import PROG, State, internal_error, say  # noqa: F401
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, Outcome, UsageError, exit_code_help
from .processes import audit as auditing
from .processes.plan import Policy

# Newer typer vendors its own click, older typer re-exports click's; both
# keep click's class names, so find them from the public BadParameter.
_CLICK = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickUsageError = _CLICK["UsageError"]
ClickException = _CLICK["ClickException"]

app = typer.Typer(
    name=PROG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make supervisord stop Celery workers properly: record each worker's process tree, "
    "then kill the whole Celery tree and spare what tasks deliberately detached.",
)

# Every option's flags, help, default and bound are rows of options.OPTIONS;
# these build typer's parameters from them, so nothing is declared twice.


def option(name: str, **extra):
    """typer's parameter for the option row *name* (see :mod:`celery_supervise.options`)."""
    row = options.OPTIONS[name]
    kwargs = dict(help=row.help or None, hidden=row.hidden)
    for key in ("metavar", "min", "envvar"):
        if getattr(row, key) is not None:
            kwargs[key] = getattr(row, key)
    return typer.Option(*row.flags, **kwargs, **extra)


def opt(name: str, **extra):
    """The annotated type of the option row *name*, for a command's signature."""
    row = options.OPTIONS[name]
    kind = List[row.type] if row.multiple else row.type
    if row.default is None and name not in options.REQUIRED:
        kind = Optional[kind]
    return Annotated[kind, option(name, **extra)]


def arg(name: str):
    """The annotated type of the positional argument row *name*."""
    row = options.ARGUMENTS[name]
    kwargs = {"metavar": row.metavar} if row.metavar else {}
    return Annotated[List[str] if row.multiple else str, typer.Argument(help=row.help, **kwargs)]


def default(name: str):
    return options.OPTIONS[name].default


JsonOpt = opt("as_json")
DryRunOpt = opt("dry_run")
JournalOpt = opt("journal")
SpareOpt = opt("spare")
ReplyTimeoutOpt = opt("reply_timeout")
DrainTimeoutOpt = opt("drain_timeout")
# The old spelling of --reply-timeout (savepid, status, restart) and of
# --drain-timeout (drain): it keeps its old meaning, see renamed().
OldTimeoutOpt = opt("timeout")
GraceOpt = opt("grace")
SupervisorUrlOpt = opt("supervisor_url")
ProgramOpt = opt("program")
CgroupsOpt = opt("cgroups")


def consoles():
    return render.consoles()


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
    app_spec: opt("app_spec") = None,
    version: opt("version", is_eager=True, callback=show_version) = False,
    audit_log: opt("audit_log") = None,
):
    if audit_log:
        # The one setting every signalling path reads (kill, restart, deploy): for this run.
        os.environ[auditing.ENV] = os.path.abspath(audit_log)
    ctx.obj = State(app_spec)


@app.command()
def savepid(
    ctx: typer.Context,
    file: arg("file"),
    supervisor_url: SupervisorUrlOpt = None,
    program: ProgramOpt = None,
    spare: SpareOpt = None,
    reply_timeout: ReplyTimeoutOpt = default("reply_timeout"),
    timeout: OldTimeoutOpt = None,
    as_json: JsonOpt = False,
    cgroups: CgroupsOpt = default("cgroups"),
) -> int:
    """Record this host's worker trees and active tasks (run before the stop)."""
    policy = Policy.parse(spare)
    reply_timeout = renamed(ctx, "timeout", "reply_timeout")
    return entry.savepid(ctx.obj, file, supervisor_url, program, policy, reply_timeout, as_json, cgroups)


@app.command()
def kill(
    ctx: typer.Context,
    file: arg("kill_file"),
    grace: GraceOpt = default("grace"),
    spare: SpareOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    cgroups: CgroupsOpt = default("cgroups"),
) -> int:
    """Kill the recorded Celery trees, sparing detached descendants (run after the stop)."""
    policy = Policy.parse(spare) if spare is not None else None
    return entry.kill(ctx.obj, file, grace, policy, dry_run, as_json, cgroups)


@app.command()
def status(
    ctx: typer.Context,
    supervisor_url: SupervisorUrlOpt = None,
    program: ProgramOpt = None,
    spare: SpareOpt = None,
    reply_timeout: ReplyTimeoutOpt = default("reply_timeout"),
    timeout: OldTimeoutOpt = None,
    as_json: JsonOpt = False,
    cgroups: CgroupsOpt = default("cgroups"),
) -> int:
    """Draw the live worker trees with each verdict; change nothing."""
    policy = Policy.parse(spare)  # before any slow discovery, so a typo fails at once
    reply_timeout = renamed(ctx, "timeout", "reply_timeout")
    return entry.status(ctx.obj, supervisor_url, program, policy, reply_timeout, as_json, cgroups)


@app.command()
def drain(
    ctx: typer.Context,
    destination: opt("destination") = None,
    all_workers: opt("all_workers") = False,
    drain_timeout: DrainTimeoutOpt = default("drain_timeout"),
    timeout: opt("old_drain_timeout") = None,
    as_json: JsonOpt = False,
) -> int:
    """Stop workers taking new tasks and wait until their running ones finish (exit 3 on timeout)."""
    state: State = ctx.obj
    timeout = renamed(ctx, "timeout", "drain_timeout")
    out, err = consoles()
    progress = render.DrainProgress(err)
    try:
        result = draining.drain(state.celery_app(), state.app_spec, destinations=destination or (),
                                  all_workers=all_workers, timeout=timeout, on_progress=progress)
    finally:
        progress.close()
    return render.render_drain(out, err, result, as_json)


@app.command()
def requeue(
    ctx: typer.Context,
    file: arg("requeue_file"),
    journal: JournalOpt = None,
    dry_run: opt("requeue_dry_run") = False,
    as_json: JsonOpt = False,
) -> int:
    """Re-send the recorded tasks the stop cut off, once (run after the stop)."""
    state: State = ctx.obj
    result = requeuing.requeue(file, state.celery_app(), journal_dir=journal, dry_run=dry_run)
    out, err = consoles()
    return render.render_requeue(out, err, result, as_json)


@app.command()
def restart(
    ctx: typer.Context,
    programs: arg("programs"),
    drain_timeout: DrainTimeoutOpt = default("drain_timeout"),
    grace: GraceOpt = default("grace"),
    start_timeout: opt("start_timeout") = default("start_timeout"),
    supervisor_url: SupervisorUrlOpt = None,
    configuration: opt("restart_configuration") = None,
    state: opt("restart_state") = None,
    reply_timeout: ReplyTimeoutOpt = default("reply_timeout"),
    timeout: OldTimeoutOpt = None,
    rolling: opt("rolling") = False,
    max_unavailable: opt("max_unavailable") = None,
    dry_run: opt("restart_dry_run") = False,
    as_json: JsonOpt = False,
) -> int:
    """Restart supervisord programs running Celery workers: savepid, drain, stop, kill, start, wait for a ping."""
    from .supervisord import rpc

    state_: State = ctx.obj
    reply_timeout = renamed(ctx, "timeout", "reply_timeout")
    if max_unavailable is not None and not rolling:
        raise UsageError("--max-unavailable goes with --rolling")
    server = rpc.find_server(supervisor_url, configuration)
    out, err = consoles()
    if dry_run:
        from .commands import restart_preview

        result = restart_preview.preview(state_.celery_app(), state_.app_spec, programs, server, rolling=rolling,
                                         max_unavailable=max_unavailable or 1, grace=grace, timeout=reply_timeout)
        return Outcome(render.render_restart_preview(out, err, result, as_json), result.problem)
    if rolling:
        return _rolling_restart(state_, programs, server, out, err, max_unavailable, state, drain_timeout, grace,
                                start_timeout, reply_timeout, as_json)
    drain_progress, wait_progress = render.DrainProgress(err), render.WaitProgress(err)
    try:
        result = restarting.restart(
            state_.celery_app(), state_.app_spec, programs, server, state_path=state, drain_timeout=drain_timeout,
            grace=grace, start_timeout=start_timeout, timeout=reply_timeout, on_drain=drain_progress,
            on_wait=wait_progress,
        )
    finally:
        drain_progress.close()
        wait_progress.close()
    return Outcome(render.render_restart(out, err, result, as_json), result.problem)


def _rolling_restart(state_: State, programs, server, out, err, max_unavailable, state, drain_timeout, grace,
                     start_timeout, reply_timeout, as_json) -> int:
    from .commands import rolling

    progress = render.RollProgress(err)
    drain_progress, wait_progress = render.DrainProgress(err), render.WaitProgress(err)
    try:
        result = rolling.roll(
            state_.celery_app(), state_.app_spec, programs, server,
            max_unavailable=max_unavailable or rolling.DEFAULT_MAX_UNAVAILABLE, state_path=state,
            drain_timeout=drain_timeout, grace=grace, start_timeout=start_timeout, timeout=reply_timeout,
            on_phase=progress, on_plan=lambda plan: render.warnings(err, plan.warnings()),
            on_drain=drain_progress, on_wait=wait_progress,
        )
    finally:
        drain_progress.close()
        wait_progress.close()
    return Outcome(render.render_rolling(out, err, result, as_json, shown=result.plan.warnings()), result.problem)


@app.command()
def deploy(
    ctx: typer.Context,
    configuration: opt("configuration") = None,
    supervisor_url: SupervisorUrlOpt = None,
    program: ProgramOpt = None,
    state: opt("state") = None,
    grace: GraceOpt = default("grace"),
    shutdown_timeout: opt("shutdown_timeout") = default("shutdown_timeout"),
    start_timeout: opt("deploy_start_timeout") = default("deploy_start_timeout"),
    reply_timeout: ReplyTimeoutOpt = default("reply_timeout"),
    no_shutdown: opt("no_shutdown") = False,
    no_start: opt("no_start") = False,
    requeue: opt("requeue") = False,
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
    kill_progress = render.WaitProgress(err)
    try:
        result = deploying.deploy(plan, load_app=state_.celery_app, progress=render.DeployProgress(err, name),
                                  on_wait=kill_progress)
    finally:
        kill_progress.close()
    lines = [f"{name}: {result.cause}"] if result.cause else []
    code = render.render_deploy(out, err, result, as_json)
    return Outcome(code, result.problem, lines + ([f"{name}: error: {result.problem}"] if result.problem else []))


@app.command("print-config")
def print_config(
    ctx: typer.Context,
    program: opt("worker_program") = None,
    command: opt("command") = None,
    directory: opt("directory") = None,
    user: opt("user") = None,
    numprocs: opt("numprocs") = default("numprocs"),
    state_dir: opt("config_state_dir") = None,
    log_dir: opt("log_dir") = None,
    contain: opt("contain") = False,
    as_json: JsonOpt = False,
) -> int:
    """Print a conf.d snippet for your supervisord: the worker's [program:] and the eventlistener."""
    from .commands import print_config as printing

    request = printing.Request(app=ctx.obj.app_spec, program=program, command=command, directory=directory,
                               user=user, numprocs=numprocs, state_dir=state_dir, log_dir=log_dir,
                               contain=contain)
    result = printing.print_config(request)
    out, err = consoles()
    return render.render_print_config(out, err, result, as_json)


@app.command()
def audit(
    since: opt("since") = None,
    pid: opt("pid") = None,
    as_json: JsonOpt = False,
) -> int:
    """Read the audit log back: one row per signal, its intent joined to its outcome (see --audit-log)."""
    from .commands import audit as auditing_cmd

    result = auditing_cmd.audit(since=since, pid=pid)
    out, err = consoles()
    return render.render_audit(out, err, result, as_json)


@app.command()
def listener(
    ctx: typer.Context,
    state_dir: opt("state_dir"),
    program: ProgramOpt = None,
    grace: GraceOpt = default("grace"),
    spare: SpareOpt = None,
    cgroups: CgroupsOpt = default("cgroups"),
) -> int:
    """Run as a supervisord eventlistener: snapshot on start/stop, reap after every stop."""
    return entry.listener(ctx.obj, state_dir, program, grace, Policy.parse(spare), cgroups)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def contain(
    command: arg("contain_command"),
    cgroups: CgroupsOpt = default("cgroups"),
) -> int:
    """Enter a cgroup of its own, then exec CMD (put it in front of the worker's command)."""
    from .commands import contain as containing

    containing.contain(command, entry.cgroup_mode(cgroups))
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
    if isinstance(exc, typer.Abort):
        return EXIT_INTERRUPTED, "interrupted", ""
    return entry.known_error(exc)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every error becomes one line on stderr."""
    try:
        code = invoke(argv)
        say(code)
        return int(code)
    except (Exception, KeyboardInterrupt) as exc:  # translated here, and nowhere else
        known = one_line(exc)
        if known is None and os.environ.get("CELERY_SUPERVISE_DEBUG"):
            raise
        return entry.report_error(known, exc)


def main() -> None:
    """The full typer CLI, every verb; the console script is :func:`celery_supervise.entry.main`."""
    entry.configure_logging()
    sys.exit(run())
