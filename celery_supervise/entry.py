"""The console entry point: the hot verbs without typer, everything else through it.

:func:`main` first asks :func:`celery_supervise.fastpath.parse` whether it
fully understands the command line. If so, it runs the verb's shell below
(the very functions the typer commands in :mod:`celery_supervise.cli` call)
and translates errors as :func:`celery_supervise.cli.run` does; typer is
never imported. If not, the typer CLI gets the command line as it is.

This module imports neither typer nor rich at import time: ``render``
(rich) comes in only to render, after the work is done.
"""

from __future__ import annotations

import logging
import os
import sys

from .errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, SuperviseError

PROG = "celery-supervise"


class State:
    """The root's options, and the Celery app loaded once, when a verb needs it."""

    def __init__(self, app_spec: str | None):
        self.app_spec = app_spec
        self._app = None

    def targets(self, supervisor_url, programs, timeout, cgroups="auto"):
        from .commands import savepid as saving

        return saving.Targets(app=self.celery_app(), app_spec=self.app_spec, supervisor_url=supervisor_url,
                              programs=tuple(programs or ()), timeout=timeout, cgroups=cgroup_mode(cgroups))

    def celery_app(self):
        if self.app_spec and self._app is None:
            from .celery_side.control import load_app

            self._app = load_app(self.app_spec)
        return self._app


# ------------------------------------------------- the hot verbs' shells
# Each takes parsed values (the policy already parsed, so a typo fails
# before any slow discovery), calls its verb's module in
# :mod:`celery_supervise.commands`, and renders with
# :mod:`celery_supervise.render`. The typer commands call these very
# functions, so both paths print the same and exit with the same code.


def cgroup_mode(value: str) -> str:
    """*value* of ``--cgroups``, checked (a usage error, before any slow work)."""
    from .processes import cgroups

    if value not in cgroups.MODES:
        from .errors import UsageError

        raise UsageError(f"--cgroups: {value!r} is not one of {', '.join(cgroups.MODES)}")
    return value


def savepid(state: State, file, supervisor_url, program, policy, reply_timeout, as_json, cgroups="auto") -> int:
    from . import render
    from .commands import savepid as saving
    from .errors import Outcome

    result = saving.savepid(file, state.targets(supervisor_url, program, reply_timeout, cgroups), policy)
    out, err = render.consoles()
    code = render.render_save(out, err, result, as_json)
    # The record *was* written: exit 3 with the broker's failure as one error line.
    return Outcome(code, result.problem, [f"{PROG}: error: {result.problem}"] if result.problem else [])


def status(state: State, supervisor_url, program, policy, reply_timeout, as_json, cgroups="auto") -> int:
    from . import render
    from .commands import savepid as saving

    result = saving.status(state.targets(supervisor_url, program, reply_timeout, cgroups), policy)
    out, err = render.consoles()
    return render.render_status(out, err, result, as_json)


def kill(state: State, file, grace, policy, dry_run, as_json, cgroups="auto") -> int:
    from . import render
    from .commands import kill as killing

    mode = cgroup_mode(cgroups)
    out, err = render.consoles()
    progress = render.WaitProgress(err)
    try:
        result = killing.kill(file, policy=policy, grace=grace, dry_run=dry_run,
                              app_spec=state.app_spec, on_wait=progress, cgroup_mode=mode)
    finally:
        progress.close()
    return render.render_kill(out, err, result, as_json)


def listener(state: State, state_dir, program, grace, policy, cgroups="auto") -> int:
    from . import listener as listening
    from .processes import statefile

    mode = cgroup_mode(cgroups)
    supervisor, rpc = listening.from_environment(dict(os.environ))
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    # Every record there would be refused, and no worker ever reaped: say so at once.
    statefile.check_folder(os.path.join(state_dir, "celery-worker@1.json"))
    return listening.Listener(
        state_dir=state_dir, programs=list(program or ()), grace=grace, policy=policy,
        app=state.celery_app(), app_spec=state.app_spec, supervisor=supervisor, rpc=rpc,
        rpc_url=os.environ["SUPERVISOR_SERVER_URL"], cgroup_mode=mode,
    ).run()


def run_call(call) -> int:
    """Run a :class:`~celery_supervise.fastpath.Call`; errors propagate (as from ``cli.invoke``)."""
    from .processes.plan import Policy

    p = dict(call.params)
    state = State(call.app_spec)
    if call.verb == "kill":
        policy = Policy.parse(p["spare"]) if p["spare"] is not None else None
        return kill(state, p["file"], p["grace"], policy, p["dry_run"], p["as_json"], p["cgroups"])
    policy = Policy.parse(p["spare"])
    if call.verb == "listener":
        return listener(state, p["state_dir"], p["program"], p["grace"], policy, p["cgroups"])
    if call.verb == "savepid":
        return savepid(state, p["file"], p["supervisor_url"], p["program"], policy, p["reply_timeout"], p["as_json"],
                       p["cgroups"])
    return status(state, p["supervisor_url"], p["program"], policy, p["reply_timeout"], p["as_json"], p["cgroups"])


# ------------------------------------------------------------ the edge


def known_error(exc: BaseException) -> tuple[int, str, str] | None:
    """``(exit code, kind, message)`` for our own errors and ^C; None for anything else.

    The typer CLI's :func:`celery_supervise.cli.one_line` adds click's and
    typer's own exceptions to these.
    """
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted", ""
    if isinstance(exc, SuperviseError):
        return exc.exit_code, "usage" if exc.exit_code == EXIT_USAGE else "error", str(exc)
    return None


def internal_error(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"


def say(code: int) -> None:
    """Print the error lines an :class:`~celery_supervise.errors.Outcome` carries, on stderr."""
    for line in getattr(code, "say", ()):
        print(line, file=sys.stderr, flush=True)


def report_error(known: tuple[int, str, str] | None, exc: BaseException) -> int:
    """Print *exc* as the CLI's one line on stderr; its exit code."""
    if known is None:  # a bug, or a library failing in a way we did not foresee
        print(f"{PROG}: {internal_error(exc)} (set CELERY_SUPERVISE_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_ERROR
    code, kind, message = known
    if kind == "interrupted":
        print(f"{PROG}: interrupted", file=sys.stderr)
    elif message:
        print(f"{PROG}: {kind}: {message}", file=sys.stderr)
    return code


def run_fast(call) -> int:
    try:
        code = run_call(call)
        say(code)
        return int(code)
    except (Exception, KeyboardInterrupt) as exc:  # translated here, as cli.run does
        known = known_error(exc)
        if known is None and os.environ.get("CELERY_SUPERVISE_DEBUG"):
            raise
        return report_error(known, exc)


def configure_logging() -> None:
    # Our own warnings, but not kombu's and Celery's chatter ("No hostname
    # was supplied") on every broker connection.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format=f"{PROG}: %(message)s")
    logging.getLogger("celery_supervise").setLevel(logging.WARNING)


def main() -> None:
    configure_logging()
    from . import fastpath

    call = fastpath.parse(sys.argv[1:], os.environ)
    if call is None:
        from . import cli

        sys.exit(cli.run())
    code = run_fast(call)
    # Skip the interpreter's teardown: with Celery, kombu and (under -A of a
    # Django project) Django loaded, running their atexit handlers and
    # freeing every module costs 0.1-0.2 s of CPU per command, more than
    # anything else we do beyond the round trip. Nothing of ours needs it:
    # the state file is written, fsynced and renamed (with its folder
    # fsynced) before savepid returns; kill has waited for what it signalled;
    # the broker connection was released by its context manager (a socket
    # left open is closed by the kernel at exit, and the broker treats it as
    # a dropped client); logging's handlers write to stderr, flushed here.
    # Only the output buffers need flushing; a flush that fails (a closed
    # pipe) must not change the exit code the work decided.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
