"""One exception tree for celery-supervise.

Every failure the tool expects is a :class:`SuperviseError`. Each edge (the
typer CLI, the Django management command, the eventlistener) translates it
exactly once: into an exit code, a ``CommandError`` or a logged line. The
``exit_code`` attribute carries the translation so the edges agree.

Exit codes (documented in the README):

* 0 -- done;
* 1 -- error, nothing was changed (nothing signalled);
* 2 -- usage error;
* 3 -- partial: a process survived SIGKILL or could not be signalled.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


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
