"""``celery-supervise -A APP print-config``: a paste-ready ``conf.d`` snippet.

It prints two sections for the user's own supervisord: the Celery worker's
``[program:NAME]``, with the settings that decide what a stop does, and the
``[eventlistener:NAME-supervise]`` that cleans up after every stop. Each
setting has a one-line comment saying why. It never prints a section that
belongs to the host (``[supervisord]``, ``[unix_http_server]``,
``[inet_http_server]``, ``[supervisorctl]``, ``[rpcinterface:…]``,
``[include]``): included from a host's ``conf.d/``, such a section would
silently replace the host's own socket, logfile or pidfile.

Two steps, as everywhere in this tool: :func:`plan` turns the options into
sections (plain data, with the defaults filled in and every value checked
and escaped for supervisord), :func:`render` turns them into text.

Values are written as supervisord reads them: ``%`` starts an expansion
there, so a lone ``%`` (Celery's ``%h`` in a node name) is doubled, while
supervisord's own expansions (``%(here)s``, ``%(process_num)02d``,
``%(ENV_HOME)s``) pass through. A value that supervisord's parser cannot
hold as given (a line break, or `` ;``/`` #``, which start an inline
comment) is refused: it would be cut short, or inject a section.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass, field

from ..errors import EXIT_OK, UsageError

#: The sections that belong to the host's supervisord.conf, never to a snippet.
HOST_SECTIONS = ("supervisord", "unix_http_server", "inet_http_server", "supervisorctl", "include")

DEFAULT_STATE_ROOT = "/var/lib/celery-supervise"
WORKER_PRIORITY = 200
LISTENER_PRIORITY = 100
STOPWAITSECS = 30
STARTSECS = 2
LISTENER_GRACE = 10
LISTENER_STOPWAITSECS = 30
BUFFER_SIZE = 50
#: PROCESS_STATE events one ``supervisorctl restart all`` emits per worker
#: process: STOPPING, STOPPED, STARTING, RUNNING (measured: bench/storm_bench.py).
EVENTS_PER_RESTART = 4
#: Room beyond them: the listener's own state changes, a TICK_60, supervisord's own state.
BUFFER_HEADROOM = 10
EVENTS = "PROCESS_STATE,SUPERVISOR_STATE_CHANGE,TICK_60"
LISTENER_SUFFIX = "-supervise"


def buffer_size_for(numprocs: int) -> int:
    """The listener's ``buffer_size`` for *numprocs* worker processes under one supervisord.

    ``restart all`` stops the listener along with the workers, so every
    event of the restart can wait in the buffer at once: four per worker,
    plus headroom; never below :data:`BUFFER_SIZE`.
    """
    return max(BUFFER_SIZE, EVENTS_PER_RESTART * numprocs + BUFFER_HEADROOM)


# supervisord's program names become "group:name" and file names: keep them plain.
_PROGRAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?\Z")
# An escaped "%%" (kept), or a "%" that does not start a supervisord expansion "%(name)..." (doubled).
_PERCENT = re.compile(r"%%|%(?!\()")
# Characters a command-line word may hold unquoted (supervisord splits with shlex).
_PLAIN_WORD = re.compile(r"[\w@%+=:,./()*-]+\Z")


@dataclass(frozen=True)
class Request:
    """What the user asked for; ``None`` means the default."""

    app: str | None
    program: str | None = None
    command: str | None = None
    directory: str | None = None
    user: str | None = None
    numprocs: int = 1
    state_dir: str | None = None
    log_dir: str | None = None
    contain: bool = False  # run the worker through `celery-supervise contain --`


@dataclass(frozen=True)
class Setting:
    key: str
    value: str  # as written in the file: escaped for supervisord
    why: str  # the one-line comment above it


@dataclass(frozen=True)
class Section:
    name: str  # "program:NAME" or "eventlistener:NAME"
    about: str  # the comment above the section
    settings: tuple[Setting, ...]

    def values(self) -> dict[str, str]:
        return {s.key: s.value for s in self.settings}


@dataclass
class PrintConfigResult:
    sections: list[Section]
    text: str
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_OK

    def to_document(self) -> dict:
        return {"exit_code": self.exit_code, "text": self.text,
                "sections": {s.name: s.values() for s in self.sections}, "warnings": self.warnings}


# ------------------------------------------------------------------ values


def supervisor_value(text: str, what: str) -> str:
    """*text* as a supervisord config value that reads back as *text* (expansions kept).

    A lone ``%`` is doubled (``demo@%h`` -> ``demo@%%h``); ``%%`` and
    ``%(name)s`` expansions are left for supervisord. Refused: control
    characters (a line break would start a new section), leading or trailing
    blanks (stripped by the parser) and a blank followed by ``;`` or ``#``
    (an inline comment: the rest would be cut off).
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"{what}: control characters (a line break, a tab…) cannot go into supervisord's config")
    if text != text.strip():
        raise UsageError(f"{what}: supervisord's config cannot keep leading or trailing blanks")
    if re.search(r"\s[;#]", text):
        raise UsageError(f"{what}: a blank followed by ';' or '#' starts a comment in supervisord's config; "
                         "the rest would be cut off (put the command in a script)")
    if not text:
        raise UsageError(f"{what}: empty")
    return _PERCENT.sub("%%", text)


def shell_word(word: str) -> str:
    """One argument of a supervisord ``command=``, quoted only when it must be (shlex rules)."""
    return word if _PLAIN_WORD.match(word) else shlex.quote(word)


def command_line(words: list[str]) -> str:
    return " ".join(shell_word(w) for w in words)


# -------------------------------------------------------------------- plan


def default_program(app: str) -> str:
    """``proj.celery:app`` -> ``proj-worker``: one program per project on a shared host."""
    top = app.split(":", 1)[0].split(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", top).strip("-.") or "celery"
    return f"{name}-worker"


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return []


def runs_celery(command: str) -> bool:
    """Whether *command* runs ``celery`` itself (``…/celery …``, ``…/python -m celery …``), not a wrapper."""
    words = _words(command)
    first = os.path.basename(words[0]) if words else ""
    return first == "celery" or (first.startswith("python") and words[1:3] == ["-m", "celery"])


def listener_command(worker_command: str, bin_dir: str) -> list[str]:
    """How to run celery-supervise with the worker's own Python.

    ``/venv/bin/celery …`` -> ``/venv/bin/celery-supervise``; ``celery …``
    (from PATH) -> ``celery-supervise``; ``/venv/bin/python -m celery …`` ->
    ``/venv/bin/python -m celery_supervise``; anything else (a wrapper
    script) -> the one beside the Python that runs print-config.
    """
    words = _words(worker_command)
    first = words[0] if words else ""
    if os.path.basename(first) == "celery":
        return [os.path.join(os.path.dirname(first), "celery-supervise")]
    if os.path.basename(first).startswith("python") and words[1:3] == ["-m", "celery"]:
        return [first, "-m", "celery_supervise"]
    return [os.path.join(bin_dir, "celery-supervise") if bin_dir else "celery-supervise"]


def plan(request: Request, *, executable: str = sys.executable, cwd: str | None = None) -> tuple[list[Section], list[str]]:
    """The two sections for *request*, defaults filled in; warnings for what looks wrong.

    *executable* (the Python that runs this tool) and *cwd* are the seams
    the defaults come from: ``celery`` beside that Python, and the folder
    print-config runs in.
    """
    if not request.app:
        raise UsageError("print-config needs -A APP: the Celery app the worker and the listener load")
    if request.numprocs < 1:
        raise UsageError("--numprocs must be at least 1")
    program = request.program or default_program(request.app)
    if not _PROGRAM.match(program):
        raise UsageError(f"--program: {program!r} is not a plain supervisord program name "
                         "(letters, digits, '_', '.', '-')")
    if request.user is not None and not _USER.match(request.user):
        raise UsageError(f"--user: {request.user!r} is not a user name")
    warnings: list[str] = []
    many = request.numprocs > 1
    bin_dir = os.path.dirname(executable) if executable else ""
    listener = program + LISTENER_SUFFIX

    if request.command is None:
        celery = os.path.join(bin_dir, "celery") if bin_dir else "celery"
        if bin_dir and not os.path.exists(celery):
            warnings.append(f"there is no {celery}: the command names it anyway (install celery there, "
                            "or pass --command)")
        node = f"{program}_%(process_num)02d@%h" if many else f"{program}@%h"
        command = command_line([celery, "-A", request.app, "worker", "-l", "info", "-n", node])
        command_why = (f"the celery of this tool's virtualenv ({bin_dir or 'PATH'}); -n: each process "
                       "a node name of its own")
    else:
        command = request.command
        command_why = "as given with --command"
        if many and "%(process_num)" not in command:
            warnings.append(f"--numprocs {request.numprocs}, but --command has no %(process_num): every process "
                            "would have the same node name (add e.g. -n name_%(process_num)02d@%h)")
    command = supervisor_value(command, "--command")
    directory = supervisor_value(request.directory or cwd or os.getcwd(), "--directory")
    state_dir = request.state_dir or f"{DEFAULT_STATE_ROOT}/{program}"
    supervisor_value(request.app, "-A")  # checked one by one, for a message that names the option
    supervisor_value(state_dir, "--state-dir")
    log_dir = supervisor_value(request.log_dir.rstrip("/") or "/", "--log-dir") if request.log_dir else None

    watch = f"{program}:*" if many else program
    listen = listener_command(command, bin_dir) + [
        "-A", request.app, "listener", "--program", watch, "--state-dir", state_dir, "--grace", str(LISTENER_GRACE)]
    listen_line = supervisor_value(command_line(listen), "the listener's command")
    user = [] if request.user is None else [
        Setting("user", request.user, "run as this user (supervisord must run as root to switch)")]

    worker_line = command
    if request.contain:
        # The same celery-supervise as the listener's, in front of the worker's own command line.
        worker_line = supervisor_value(command_line(listener_command(command, bin_dir) + ["contain", "--"]),
                                       "--command") + " " + command
        command_why += "; through `celery-supervise contain`: a cgroup of its own before its first fork"
    worker = [Setting("command", worker_line, command_why)]
    if many:
        worker += [
            Setting("numprocs", str(request.numprocs), f"{request.numprocs} workers, each a process of its own"),
            Setting("process_name", "%(program_name)s_%(process_num)02d",
                    "numprocs > 1 needs a name per process: NAME_00, NAME_01, …"),
        ]
    worker += [
        Setting("directory", directory, f"where -A {request.app} is importable, as for `celery -A` from a shell"),
        *user,
        Setting("priority", str(WORKER_PRIORITY),
                f"higher than the listener's {LISTENER_PRIORITY}: on shutdown the worker is stopped first, "
                "the listener last"),
        Setting("autostart", "true", "start with supervisord"),
        Setting("autorestart", "true", "start again whenever it exits, even cleanly (`celery control shutdown`)"),
        Setting("startsecs", str(STARTSECS), "RUNNING once up this long: a worker whose app fails to import is "
                "retried, then FATAL"),
        Setting("stopsignal", "TERM", "a warm shutdown: take no new task, let the running ones finish "
                "(QUIT would cut them off)"),
        Setting("stopwaitsecs", str(STOPWAITSECS),
                "time for that (an idle worker needs ~5 s; raise it for longer tasks), then SIGKILL of the main"),
        Setting("stopasgroup", "false", "signal the main process only: its group also holds what tasks "
                "nohup'd on purpose"),
        Setting("killasgroup", "false", "no SIGKILL to the group either: the listener kills what is attached, "
                "spares the nohup'd"),
        Setting("redirect_stderr", "true", "Celery logs to stderr: one log per process"),
    ]
    if log_dir:
        name = "%(program_name)s_%(process_num)02d" if many else program
        worker.append(Setting("stdout_logfile", f"{log_dir}/{name}.log", "the worker's log"))

    listen_settings = [
        Setting("command", listen_line,
                ("celery-supervise of the worker's Python, so it loads -A as the worker does"
                 if runs_celery(command) else "celery-supervise of this tool's Python (the worker runs a wrapper)")
                + f"; it watches {watch} only"),
        Setting("directory", directory, f"where -A {request.app} is importable, as for the worker"),
        *([Setting("user", request.user,
                   f"the worker's user, who may signal what its tasks start (create {state_dir} for it, 0700)")]
          if request.user is not None else []),
        Setting("events", EVENTS, "the worker's starts and stops, supervisord's own, and a tick for its sweeps"),
        Setting("priority", str(LISTENER_PRIORITY),
                f"LOWER than the worker's {WORKER_PRIORITY}: started first, stopped last on shutdown, "
                "when it reaps the workers"),
        Setting("autostart", "true", "start with supervisord"),
        Setting("autorestart", "true", "start again if it dies; on its return it sweeps what it missed"),
        Setting("stopsignal", "TERM", "on TERM it finishes reaping the workers already stopped, then exits"),
        Setting("stopwaitsecs", str(LISTENER_STOPWAITSECS),
                f"longer than --grace {LISTENER_GRACE} (and 2 s for SIGKILL): that reap is never cut short"),
        Setting("buffer_size", str(buffer_size_for(request.numprocs)),
                f"room for a `restart all`: {EVENTS_PER_RESTART} events a worker + {BUFFER_HEADROOM}, at least "
                f"{BUFFER_SIZE} (when full, supervisord drops the oldest; its default is 10)"),
        Setting("stdout_logfile", "NONE", "stdout is the eventlistener protocol, not a log"),
    ]
    if log_dir:
        listen_settings.append(Setting("stderr_logfile", f"{log_dir}/{listener}.log",
                                       "one JSON line per action: recorded, reaped, refused…"))
    sections = [
        Section(f"program:{program}", f"The Celery worker of -A {request.app}.", tuple(worker)),
        Section(f"eventlistener:{listener}",
                f"celery-supervise's eventlistener: records {watch}'s process trees (in --state-dir, 0700) and, "
                "right after every stop, kills what the worker left attached, sparing what tasks setsid'd "
                "or nohup'd.", tuple(listen_settings)),
    ]
    return sections, warnings


# ------------------------------------------------------------------ render


def invocation(request: Request) -> str:
    """The command line that prints this snippet again."""
    words = ["celery-supervise", "-A", request.app or "APP", "print-config"]
    for option, value in (("--program", request.program), ("--command", request.command),
                          ("--directory", request.directory), ("--user", request.user),
                          ("--numprocs", None if request.numprocs == 1 else str(request.numprocs)),
                          ("--state-dir", request.state_dir), ("--log-dir", request.log_dir)):
        if value is not None:
            words += [option, value]
    if request.contain:
        words.append("--contain")
    return shlex.join(words)


def render(sections: list[Section], request: Request) -> str:
    lines = [
        f"; supervisord programs for the Celery app {request.app}: the worker and celery-supervise's eventlistener.",
        f"; Printed by: {invocation(request)}",
        "; Put it in a file your supervisord.conf includes ([include] files = conf.d/*.conf), then run",
        ";   supervisorctl reread && supervisorctl update",
        "; It has only [program:] and [eventlistener:] sections: your host's [supervisord], [unix_http_server],",
        "; [inet_http_server] and [supervisorctl] stay as they are. The listener calls supervisord's XML-RPC,",
        "; which the host's [rpcinterface:supervisor] section (in every stock config) provides.",
    ]
    for section in sections:
        lines += ["", *(f"; {line}" for line in textwrap.wrap(section.about, 100)), f"[{section.name}]"]
        for s in section.settings:
            lines += [f"; {s.why}", f"{s.key}={s.value}"]
    return "\n".join(lines) + "\n"


def print_config(request: Request, *, executable: str = sys.executable, cwd: str | None = None) -> PrintConfigResult:
    """The snippet for *request*; see :func:`plan` for the seams."""
    sections, warnings = plan(request, executable=executable, cwd=cwd)
    for section in sections:
        kind = section.name.split(":", 1)[0]
        if kind in HOST_SECTIONS or kind not in ("program", "eventlistener"):  # never, by construction
            raise UsageError(f"internal: would print a [{section.name}] section")
    return PrintConfigResult(sections, render(sections, request), warnings)


__all__ = ["Request", "Section", "Setting", "PrintConfigResult", "plan", "render", "print_config",
           "supervisor_value", "listener_command", "HOST_SECTIONS"]
