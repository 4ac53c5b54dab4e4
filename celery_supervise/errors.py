"""One exception tree for celery-supervise.

Every failure the tool expects is a :class:`SuperviseError`. Each edge (the
typer CLI, the Django management command, the eventlistener) translates it
exactly once: into an exit code, a ``CommandError`` or a logged line. The
``exit_code`` attribute carries the translation so the edges agree.

Exit codes: 0 done; 1 error, nothing was changed (nothing signalled);
2 usage error; 3 partial. What each means for each command is written once,
in :data:`EXIT_CODES`: every command's ``--help`` lists its own, and the
Django command words its ``CommandError`` for a partial result from it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130

_USAGE = "usage error (a bad option or value); nothing was done"

#: What each command's exit codes mean, in one table. A command missing
#: here (a new verb) gets :data:`GENERIC_EXIT_CODES`.
EXIT_CODES: dict[str, dict[int, str]] = {
    "savepid": {
        EXIT_OK: "the record is written, with every worker's active tasks",
        EXIT_ERROR: "error; nothing was written",
        EXIT_USAGE: _USAGE,
        EXIT_PARTIAL: "the broker failed: the record has the process trees but not the active tasks (see above)",
    },
    "kill": {
        EXIT_OK: "every recorded Celery process is gone, the detached ones spared (with --dry-run: the plan is shown)",
        EXIT_ERROR: "error; nothing was signalled",
        EXIT_USAGE: _USAGE,
        EXIT_PARTIAL: "some processes could not be killed (see the table)",
    },
    "status": {
        EXIT_OK: "the trees are shown",
        EXIT_ERROR: "error",
        EXIT_USAGE: _USAGE,
    },
    "drain": {
        EXIT_OK: "every target worker is drained: it takes no new task and runs none",
        EXIT_ERROR: "error; no consumer was cancelled (unless the message says so)",
        EXIT_USAGE: _USAGE,
        EXIT_PARTIAL: "the drain timed out with tasks still running (see the table)",
    },
    "requeue": {
        EXIT_OK: "every recorded task the stop cut off is re-sent, the others skipped (with --dry-run: shown)",
        EXIT_ERROR: "error; nothing was re-sent",
        EXIT_USAGE: _USAGE,
        EXIT_PARTIAL: "the broker failed before every task was re-sent (see the table); run requeue again",
    },
    "restart": {
        EXIT_OK: "drained, stopped, cleaned up, started, and every new worker answered a ping",
        EXIT_ERROR: "error; nothing was drained, stopped or started",
        EXIT_USAGE: _USAGE + "; with --rolling also: a single process, or --max-unavailable as large as "
                    "the number of processes (no consumer would be left)",
        EXIT_PARTIAL: "stopped short: the drain timed out (nothing stopped; with --rolling the batch consumes "
                      "again and the batches before stay replaced), a leftover survived, "
                      "or a new worker did not answer; the last line says which and what to run next",
    },
    "deploy": {
        EXIT_OK: "the workers were stopped, their leftovers killed (the detached spared), and they run again",
        EXIT_ERROR: "error; nothing was stopped (a savepid that fails, its broker-down case included, ends here)",
        EXIT_USAGE: _USAGE,
        EXIT_PARTIAL: "the workers were stopped, but something after went wrong: supervisord did not exit or "
                      "start in time, a leftover survived, --requeue failed, or a new worker did not answer; "
                      "the last line says which",
    },
    "print-config": {
        EXIT_OK: "the snippet is printed",
        EXIT_ERROR: "error; nothing was printed",
        EXIT_USAGE: _USAGE,
    },
    "listener": {
        EXIT_OK: "end of input or SIGTERM: supervisord is gone or stopped the listener",
        EXIT_ERROR: "error at start-up (the state folder, the Celery app)",
        EXIT_USAGE: "a bad option, or not run by supervisord as an eventlistener section",
    },
}

GENERIC_EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_ERROR: "error; nothing was changed",
    EXIT_USAGE: _USAGE,
    EXIT_PARTIAL: "partial: some of the work was done (see the output)",
}


def exit_codes(command: str) -> dict[int, str]:
    """What *command*'s exit codes mean, 130 (interrupted) included."""
    return {**EXIT_CODES.get(command, GENERIC_EXIT_CODES), EXIT_INTERRUPTED: "interrupted (Ctrl-C)"}


def exit_code_help(command: str) -> str:
    """The ``Exit codes`` paragraph of *command*'s ``--help``."""
    rows = "\n\n".join(f"{code:>3}  {meaning}" for code, meaning in exit_codes(command).items())
    return f"Exit codes:\n\n{rows}"


class Outcome(int):
    """An exit code that can say why it is not 0, in one line.

    A command returns it; the CLI exits with it, and the Django command
    turns a non-zero one into ``CommandError(problem, returncode=code)``.
    Without a *problem* of its own, the line is the command's entry in
    :data:`EXIT_CODES`. *say* holds the error lines each shell's edge
    prints on stderr after the output (a savepid whose broker failed, a
    deploy that stopped short), already worded: nothing else prints them.
    """

    problem: str | None
    say: tuple[str, ...]

    def __new__(cls, code: int, problem: str | None = None, say: tuple[str, ...] = ()) -> "Outcome":
        self = super().__new__(cls, code)
        self.problem = problem
        self.say = tuple(say)
        return self

    def explain(self, command: str) -> str:
        return self.problem or exit_codes(command).get(int(self), f"exit code {int(self)}")


class SuperviseError(Exception):
    """Base of every error the tool reports; ``str()`` is the one-line message."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # One line, always: the edges print this verbatim to stderr.
        return " ".join(self.message.split())


class UsageError(SuperviseError):
    """The command line itself is wrong (bad option value, conflicting flags)."""

    exit_code = EXIT_USAGE


class StateFileError(SuperviseError):
    """A state file is missing, unreadable, malformed or not to be trusted."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class UnsafeStateError(StateFileError):
    """The state file is readable but acting on it could harm a stranger."""


class AppError(SuperviseError):
    """The Celery app named with ``-A`` or by Django could not be loaded."""


class SupervisorError(SuperviseError):
    """supervisord's XML-RPC interface could not be reached or answered badly."""

    def __init__(self, url: str, problem: str):
        super().__init__(f"supervisord at {url}: {problem}")
        self.url = url
        self.problem = problem


class BrokerError(SuperviseError):
    """The broker (Celery's remote control) did not answer."""


class JournalError(SuperviseError):
    """The task journal's directory cannot be read, or is not to be trusted."""


class PartialError(SuperviseError):
    """Some process could not be killed; raised only after acting."""

    exit_code = EXIT_PARTIAL
