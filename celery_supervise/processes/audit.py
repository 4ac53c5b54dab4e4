"""The audit log: one JSON line before and one after every signal we send.

Process layer: it knows procs and signals, never Celery or supervisord.
:func:`celery_supervise.kill.execute` takes an :class:`AuditLog` as a seam
and calls :meth:`AuditLog.intend` before each round of signals (SIGTERM to
every target, later SIGKILL to the survivors) and :meth:`AuditLog.settle`
after it. Each round is one ``write()`` of its lines: O_APPEND makes one
write land whole at the end of the file, so concurrent writers (a CLI kill
beside the listener) never interleave inside a line. The intent round is
fsync'ed before the first signal goes out, so a crash mid-kill still leaves
the intent on disk; the outcome round is fsync'ed too. That is two fsyncs
per round, whatever the number of processes, where one per line would cost
a 1,000-process kill a thousand.

The file is opened afresh for every run (one kill, one warm-stop), so
logrotate may move it at any time: the next run creates a new one.

Threat model: the tool often runs as root, and the log path can come from
the environment. The last component is opened with O_NOFOLLOW (a symlink
is refused, never followed) and O_NONBLOCK (a FIFO cannot block a kill);
a file that is not regular, or is owned by another user, is refused, and
so is a folder another user could swap files in. A log that cannot be
written never blocks a kill: :attr:`AuditLog.error` says why, once.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import signal as signals
import stat
import sys
import time
import uuid
from typing import Callable, Iterable, Mapping, Sequence

from .procs import Proc

ENV = "CELERY_SUPERVISE_AUDIT_LOG"
ROOT_PATH = "/var/log/celery-supervise/audit.jsonl"
FILE_NAME = "audit.jsonl"

INTENT = "intent"
OUTCOME = "outcome"

# Outcomes, as the log words them (from kill's results of one signal attempt).
DELIVERED = "delivered"
GONE = "gone"
REFUSED = "refused"


def default_path(env: Mapping[str, str] = os.environ, euid: int | None = None) -> str:
    """Where the log goes without ``--audit-log``: root's under /var/log, a user's under XDG_STATE_HOME."""
    if env.get(ENV):
        return env[ENV]
    if (os.geteuid() if euid is None else euid) == 0:
        return ROOT_PATH
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "celery-supervise", FILE_NAME)


# user:password@ in a URL on our command line (--supervisor-url, a broker URL).
_SECRET = re.compile(r"(://[^/@:\s]*:)[^@/\s]*@")


def redact(arg: str) -> str:
    """*arg* without the password of a URL in it: the log outlives the command line."""
    return _SECRET.sub(r"\1***@", arg)


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def signal_name(sig: int) -> str:
    try:
        return signals.Signals(sig).name
    except ValueError:
        return str(sig)


class AuditLog:
    """The audit lines of one run (one kill, one warm-stop), written to *path*.

    *verb* and *argv* say which command sent the signals; *record* is the
    state file or listener record the targets came from (*records*: each
    PID's own, where one run spans several records). Nothing is opened
    until the first :meth:`intend`, so a dry run (which never signals)
    leaves no trace, not even an empty file.
    """

    def __init__(self, verb: str, *, path: str | None = None, record: str | None = None,
                 records: Mapping[int, str] | None = None, argv: Sequence[str] | None = None,
                 clock: Callable[[], float] = time.time, env: Mapping[str, str] = os.environ):
        self.verb = verb
        self.path = os.path.abspath(path or default_path(env))
        self.record = record
        self.records = dict(records or {})  # pid -> its own record, where one run spans several (warm-stop)
        self.argv = [redact(a) for a in (sys.argv if argv is None else argv)]
        self.clock = clock
        self.run = uuid.uuid4().hex
        self.uid = os.getuid()
        self.lines = 0
        self.error: str | None = None
        self._processes: dict[tuple[int, float], str] = {}

    @property
    def written(self) -> bool:
        return self.error is None

    def document(self) -> dict:
        """What ``--json`` says about the log."""
        return {"path": self.path, "run": self.run, "written": self.written, "error": self.error, "lines": self.lines}

    def warning(self) -> str | None:
        return None if self.error is None else f"audit log not written: {self.error}"

    # -------------------------------------------------------------- writing

    def intend(self, sig: int, targets: Iterable[tuple[Proc, str]]) -> None:
        """Log that *sig* is about to go to each ``(proc, reason)``; durable before it returns."""
        self._append(self._lines(INTENT, sig, [(proc, reason, None) for proc, reason in targets]))

    def settle(self, sig: int, results: Iterable[tuple[Proc, str, str]]) -> None:
        """Log what became of *sig* for each ``(proc, reason, outcome)``."""
        self._append(self._lines(OUTCOME, sig, list(results)))

    def _lines(self, phase: str, sig: int, items: list[tuple[Proc, str, str | None]]) -> list[str]:
        # A round's lines are written together, so they share one time. They
        # are built from fragments encoded once (the fields common to the
        # round, each process, each reason): a 1,000-process kill waits for
        # its intent lines before its first signal, and encoding each line
        # whole cost more than the signals themselves.
        if not items:
            return []
        now = self.clock()
        head = _dumps({"time": iso(now), "epoch": round(now, 6), "run": self.run, "phase": phase,
                       "command": {"verb": self.verb, "argv": self.argv}, "uid": self.uid,
                       "by": os.getpid(), "signal": signal_name(sig)})[:-1]
        texts: dict[object, str] = {}

        def text(value) -> str:
            if value not in texts:
                texts[value] = _dumps(value)
            return texts[value]

        return [f'{head}, "record": {text(self.records.get(proc.pid, self.record))}, '
                f'"process": {self._process(proc)}, "reason": {text(reason)}, "outcome": {text(outcome)}}}\n'
                for proc, reason, outcome in items]

    def _process(self, proc: Proc) -> str:
        key = (proc.pid, proc.create_time)
        if key not in self._processes:  # an intent's process is its outcome's: encoded once
            self._processes[key] = _dumps({"pid": proc.pid, "create_time": proc.create_time,
                                           "cmdline": list(proc.cmdline)})
        return self._processes[key]

    def _append(self, lines: list[str]) -> None:
        if not lines or self.error is not None:
            return  # one failure per run is reported, and the kill goes on
        data = "".join(lines).encode("utf-8", "surrogateescape")
        try:
            fd = open_log(self.path)
            try:
                written = os.write(fd, data)
                if written != len(data):  # a full disk; O_APPEND writes to a file are otherwise whole
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc}"
            return
        except LogRefused as exc:
            self.error = str(exc)
            return
        self.lines += len(lines)


def _dumps(value) -> str:
    # json's C encoder, default options: a cmdline's undecodable bytes (kept
    # by surrogateescape) come out as \udcXX escapes, still valid JSON.
    return json.dumps(value)


class LogRefused(Exception):
    """The log path is not one we may append to (a symlink, another user's file...)."""


def open_log(path: str) -> int:
    """Open *path* for appending, creating it (and its folder) mode 0600/0700; refuse what is unsafe."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        try:  # another writer may be creating it at this very moment: exist_ok
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except FileExistsError:
            raise LogRefused(f"{folder} is not a folder") from None
    _check_folder(folder)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)  # 0600 from creation: the umask can only take bits away
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LogRefused(f"{path} is a symlink; the audit log is never written through one") from None
        if exc.errno == errno.ENXIO:
            raise LogRefused(f"{path} is a FIFO or socket, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LogRefused(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise LogRefused(f"{path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # ours but readable by others: a rotation tool may have created it so
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_folder(folder: str) -> None:
    # A folder another user can write to lets them replace the file between
    # our checks and our write (a symlink after a rename...): refuse it,
    # unless it is sticky (/tmp), where they cannot touch a file of ours.
    st = os.stat(folder)
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise LogRefused(f"{folder} is owned by uid {st.st_uid}: the audit log's folder must be ours or root's")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise LogRefused(f"{folder} is writable by other users: the audit log's folder must not be")


# ------------------------------------------------------------------ reading


def read_lines(path: str) -> tuple[list[dict], int]:
    """Every line of the log that parses, and how many did not (a torn last line...)."""
    lines, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                bad += 1
                continue
            if isinstance(line, dict) and line.get("phase") in (INTENT, OUTCOME):
                lines.append(line)
            else:
                bad += 1
    return lines, bad


def join(lines: Iterable[dict]) -> list[dict]:
    """One row per signal: each intent with its outcome (None when the run died before it)."""
    rows: list[dict] = []
    open_: dict[tuple, list[dict]] = {}
    for line in lines:
        proc = line.get("process") or {}
        key = (line.get("run"), proc.get("pid"), proc.get("create_time"), line.get("signal"))
        if line["phase"] == INTENT:
            row = {"intent": line, "outcome": None}
            rows.append(row)
            open_.setdefault(key, []).append(row)
        else:
            waiting = open_.get(key)
            if waiting:
                waiting.pop(0)["outcome"] = line
            else:  # its intent was rotated away or torn: keep the outcome all the same
                rows.append({"intent": None, "outcome": line})
    return rows
