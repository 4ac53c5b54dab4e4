"""The task journal: which tasks started, and which finished, written by the worker itself.

``requeue`` must tell a task that was cut off from one that finished after
savepid recorded it. Only the worker knows, so the worker writes it down,
from Celery's own signals: ``task_prerun`` (the task is about to run, in
the process that runs it) appends a ``started`` line, ``task_postrun`` a
``finished`` line with the task's state (SUCCESS, FAILURE, RETRY…). A task
killed in between has the first and never the second. One terminated in
the middle (a cold shutdown sends its pool process SIGTERM, which unwinds
the task with ``SystemExit``) still gets ``task_postrun``, but without a
state: that is written as ``interrupted``, not ``finished``.

Enable it with one line in the module that creates your app::

    celery_supervise.journal.install(app, "/var/lib/proj/celery-journal")

or ``install(app)`` with the directory in the ``CELERY_SUPERVISE_JOURNAL``
setting (Django, ``namespace="CELERY"``) or ``app.conf.supervise_journal``.
``requeue`` loads the same app, so it finds the directory the same way.

The format, and why:

* **One append-only file per host and hour** (``HOST-YYYYMMDDHH.journal``,
  UTC), shared by every process of the workers, one JSON line per event,
  each written with a single ``write(2)`` on an ``O_APPEND`` descriptor.
  Linux moves to the end of the file and writes as one step, under the
  file's lock, so lines of different processes never interleave (on a
  local filesystem: not NFS). That is one system call per event, no lock
  of ours, and a directory that stays small whatever the pool does
  (``worker_max_tasks_per_child=1`` forks a process per task); one file
  per task id, or per process, would leave a file per task there.
* **No fsync.** A ``write`` that returned is in the kernel's page cache,
  which a SIGKILL of the writer does not touch: the line is there for the
  next reader. Only a crash of the whole machine can lose it, and after a
  reboot ``requeue`` refuses the state file anyway (its PIDs and tasks
  describe a world that is gone).
* **Rotation and retention.** Each hour has its own file. A process that
  opens one deletes the directory's files untouched for ``retention``
  seconds (default a day); it never writes to a file older than the
  current hour, so it never writes to one another process just deleted. ``requeue`` only reads lines written since the tasks it
  looks for started. A line lost to pruning or to any other mishap makes
  ``requeue`` treat the task as unknown, which means re-sending it: the
  journal can cause a duplicate, never a lost task.
* **Never in the task's way.** Any error writing the journal is logged once
  per process and swallowed; the task runs as if there were no journal.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from ..errors import JournalError

log = logging.getLogger(__name__)

#: The setting that names the directory, as ``app.conf`` sees it: Django's
#: ``CELERY_SUPERVISE_JOURNAL`` under ``namespace="CELERY"``.
SETTING = "supervise_journal"
#: The journal file of an hour: the host, then the hour (UTC).
FILE_TIME = "%Y%m%d%H"
#: Files untouched for this long are deleted when a process opens a new one.
DEFAULT_RETENTION = 24 * 3600.0
SUFFIX = ".journal"
#: The task id of a line, found without parsing the whole line.
_ID = re.compile(rb'"id":\s*"((?:[^"\\]|\\.)*)"')

STARTED = "started"
FINISHED = "finished"
INTERRUPTED = "interrupted"
#: Of two events of one task at the same instant, the later in a run wins.
_ORDER = {STARTED: 0, INTERRUPTED: 1, FINISHED: 2}

#: Attribute of the Celery app where :func:`install` leaves its journal.
_APP_ATTR = "_celery_supervise_journal"


# -------------------------------------------------------------------- writer


class Journal:
    """Appends ``started``, ``finished`` and ``interrupted`` lines to one directory.

    One instance serves every process forked from the one that created it
    (prefork pool processes): the file is opened lazily, by the process
    that writes, and again after a fork. *clock* is the wall clock.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, app=None,
                 retention: float = DEFAULT_RETENTION, clock=time.time):
        self._directory = os.fspath(directory) if directory is not None else None
        self._app = app
        self.retention = retention
        self.clock = clock
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._fd: int | None = None
        self._pid: int | None = None
        self._name: str | None = None
        self._failed_pid: int | None = None  # the process that already logged a failure

    @property
    def directory(self) -> str | None:
        """The directory: the one given, else the app's setting (read when first needed)."""
        if self._directory is None and self._app is not None:
            self._directory = setting_directory(self._app)
        return self._directory

    def started(self, task_id: str, name: str | None = None) -> None:
        self._record({"e": STARTED, "id": task_id, "name": name})

    def finished(self, task_id: str, state: str | None = None) -> None:
        """The task returned or raised (*state*); without a state it was terminated midway."""
        if state is None:
            self._record({"e": INTERRUPTED, "id": task_id})
        else:
            self._record({"e": FINISHED, "id": task_id, "state": state})

    def _record(self, event: dict) -> None:
        try:
            directory = self.directory
            if not directory:
                return
            event["t"] = round(self.clock(), 6)
            event["pid"] = os.getpid()
            line = (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
            if self._lock_pid != event["pid"]:
                # Forked: another thread may have held the lock at that moment,
                # and it does not exist here to release it.
                self._lock, self._lock_pid = threading.Lock(), event["pid"]
            with self._lock:
                os.write(self._file(directory), line)
        except Exception as exc:  # the journal must never fail a task
            if self._failed_pid != os.getpid():
                self._failed_pid = os.getpid()
                log.error("celery-supervise journal: cannot write to %s: %s "
                          "(requeue will treat this process's tasks as unknown)", self._directory, exc)

    def _file(self, directory: str) -> int:
        now = self.clock()
        pid = os.getpid()
        name = f"{socket.gethostname()}-{time.strftime(FILE_TIME, time.gmtime(now))}{SUFFIX}"
        if self._fd is not None and self._pid != pid:
            # Forked: the descriptor is the parent's; the parent closes it.
            self._fd = None
        if self._fd is not None and self._name != name:
            os.close(self._fd)  # a new hour
            self._fd = None
        if self._fd is None:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            prune(directory, self.retention, now)
            self._fd = os.open(os.path.join(directory, name),
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self._pid, self._name = pid, name
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def prune(directory: str, retention: float, now: float) -> int:
    """Delete the journal files in *directory* untouched for *retention* seconds."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.endswith(SUFFIX):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > retention:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass  # another process pruned it first
    return removed


def install(app, directory: str | os.PathLike | None = None, *, retention: float = DEFAULT_RETENTION) -> Journal:
    """Make *app*'s workers journal every task they run; return the :class:`Journal`.

    *directory* defaults to the app's ``supervise_journal`` setting
    (``CELERY_SUPERVISE_JOURNAL`` in Django settings), read when the first
    task runs, so calling this at import time does not load the
    configuration early. Without either, nothing is written. Installing
    twice on one app replaces the first journal.
    """
    from celery import signals

    journal = Journal(directory, app=app, retention=retention)
    previous = getattr(app, _APP_ATTR, None)
    setattr(app, _APP_ATTR, journal)
    if previous is not None:
        return journal  # the handlers below read the app's current journal

    def ours(task) -> Journal | None:
        # Signals are process-wide: only tasks of this app go to its journal.
        try:
            return getattr(app, _APP_ATTR) if task is not None and task.app is app else None
        except Exception:
            return None

    def on_prerun(sender=None, task_id=None, task=None, **_):
        j = ours(task or sender)
        if j is not None and task_id:
            j.started(task_id, getattr(task or sender, "name", None))

    def on_postrun(sender=None, task_id=None, task=None, state=None, **_):
        j = ours(task or sender)
        if j is not None and task_id:
            j.finished(task_id, state)

    uid = f"celery_supervise.journal.{id(app)}"
    signals.task_prerun.connect(on_prerun, weak=False, dispatch_uid=uid + ".prerun")
    signals.task_postrun.connect(on_postrun, weak=False, dispatch_uid=uid + ".postrun")
    return journal


def setting_directory(app) -> str | None:
    """The directory named by the app's configuration, if any."""
    value = app.conf.get(SETTING) or app.conf.get("celery_" + SETTING)
    return os.fspath(value) if value else None


def configured_directory(app) -> str | None:
    """The journal directory of *app*: the one :func:`install` was given, else the setting."""
    journal = getattr(app, _APP_ATTR, None)
    if journal is not None and journal.directory:
        return journal.directory
    return setting_directory(app)


# -------------------------------------------------------------------- reader


@dataclass(frozen=True)
class Entry:
    """What the journal says about one task id: its latest event."""

    task_id: str
    event: str  # STARTED, FINISHED or INTERRUPTED
    time: float
    state: str | None = None  # the task's state, for FINISHED (SUCCESS, FAILURE, RETRY…)
    pid: int | None = None

    @property
    def finished(self) -> bool:
        return self.event == FINISHED


def read(directory: str, task_ids: Iterable[str], since: float | None = None) -> dict[str, Entry]:
    """The latest journal entry of each of *task_ids* found in *directory*.

    Files last written before *since* (wall clock) are skipped: they cannot
    hold a line about a task that started after it. A line that does not
    parse (the torn end of a file) is ignored. A directory that does not
    exist yields nothing; one that others could write is refused.
    """
    wanted = set(task_ids)
    out: dict[str, Entry] = {}
    if not wanted:
        return out
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise JournalError(f"journal {directory}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(dir_fd)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise JournalError(f"journal {directory} is group- or world-writable "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to trust it")
        for name in sorted(os.listdir(dir_fd)):
            if not name.endswith(SUFFIX):
                continue
            for entry in _entries(dir_fd, name, wanted, since):
                known = out.get(entry.task_id)
                # The latest event wins: a task retried (same id) starts again after it finished.
                if known is None or (entry.time, _ORDER[entry.event]) >= (known.time, _ORDER[known.event]):
                    out[entry.task_id] = entry
    finally:
        os.close(dir_fd)
    return out


def _entries(dir_fd: int, name: str, wanted: set[str], since: float | None) -> Iterable[Entry]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return  # pruned meanwhile, or a symlink: not ours
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (since is not None and st.st_mtime < since):
            return
        for raw in f:
            entry = parse_line(raw, wanted)
            if entry is not None:
                yield entry


def parse_line(raw: bytes, wanted: set[str] | None = None) -> Entry | None:
    """One journal line as an :class:`Entry`, or ``None`` if torn, foreign or not wanted."""
    if wanted is not None:
        # Most lines are about other tasks: skip them before parsing. An id
        # with escapes in it is left to the JSON parser.
        m = _ID.search(raw)
        if m is None:
            return None
        if b"\\" not in m.group(1) and m.group(1).decode(errors="replace") not in wanted:
            return None
    try:
        event = json.loads(raw)
        task_id, kind, when = event["id"], event["e"], float(event["t"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(task_id, str) or kind not in _ORDER:
        return None
    if wanted is not None and task_id not in wanted:
        return None
    state = event.get("state")
    pid = event.get("pid")
    return Entry(task_id, kind, when, state if isinstance(state, str) else None, pid if isinstance(pid, int) else None)


__all__ = ["install", "Journal", "Entry", "read", "configured_directory", "JournalError", "STARTED", "FINISHED",
           "INTERRUPTED"]
