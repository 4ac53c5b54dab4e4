"""State files: what savepid records and kill trusts.

A state file is the only input that makes this tool signal processes, so it
is read defensively: it is refused unless it is a regular file (not a
symlink), owned by us (by root when we run as root), not group- or
world-writable, in a folder others cannot write (or a sticky one), of a
known schema, written on this host since the last boot,
and every PID in it is a positive number other than 1. Any refusal is a
:class:`StateFileError` before anything is signalled.

One PID 1 is accepted: the supervisord a record names, when PID 1 in the
reader's own PID namespace runs supervisord (a container whose PID 1 is
supervisord), and, for the listener's records, which carry its creation
time, is that very process. It is only ever compared with live processes
and protected, never signalled (see :func:`celery_supervise.processes.revisit.protected_pids`).

"Since the last boot" is decided by the kernel's boot id, which the file
records (``boot_id``, since this tool's first schema-1 files lacked it).
The recorded creation times are then *rebased* to the reader's boot time:
both are psutil's ``ticks / CLK_TCK + btime``, and ``btime`` moves when the
realtime clock is set (see :func:`celery_supervise.processes.procs.boot_time`), so
adding the difference of the two ``btime`` readings gives back exactly the
creation time the reader computes for the same process. A file without a
boot id is read under the old rule: its boot time must agree with ours
within :data:`BOOT_TIME_TOLERANCE` (a clock set by more than that since it
was written makes it look like one from before a reboot: refused, never
acted on wrongly).

Writing is atomic (temp file in the same folder, fsync, rename) with mode
0600, so a crash mid-write leaves the old file or the new one, never half.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

from ..errors import StateFileError, UnsafeStateError
from .plan import Policy, Verdict
from . import procs
from .procs import ROLES, Proc
from .cgroups import Cgroup
from .snapshot import Snapshot, Task, Worker, hostname

SCHEMA = 1  # boot_id is an optional addition: older readers ignore it, newer ones fall back without it
KIND = "celery-supervise/state"
# Files without a boot id only: two readings of the boot time agree to well
# under this, unless the clock was set in between; a reboot moves it by at
# least the previous uptime.
BOOT_TIME_TOLERANCE = 2.0

LEGACY_PIDS = re.compile(rb"\A\s*[0-9]+(?:\s+[0-9]+)*\s*\Z")


@dataclass(frozen=True)
class Record:
    """A parsed, validated state file."""

    snapshot: Snapshot
    policy: Policy
    verdicts: tuple[dict, ...] = ()
    # The listener's records: (pid, creation time) of the supervisord that ran the worker.
    supervisor: tuple[int, float] | None = None
    # What was added to every recorded creation time (reader's boot time - writer's).
    rebased_by: float = 0.0


@dataclass(frozen=True)
class LegacyRecord:
    """The old deploy script's file: bare PIDs, no identities."""

    pids: tuple[int, ...]


# --------------------------------------------------------------------- write


def proc_to_dict(p: Proc) -> dict:
    d = asdict(p)
    d["cmdline"] = list(p.cmdline)
    return d


def to_document(snapshot: Snapshot, policy: Policy, verdicts: Iterable[Verdict],
                supervisor: procs.Identity | None = None) -> dict:
    """The state file's document; *supervisor* is the identity of the supervisord a listener's record names."""
    doc = {
        "schema": SCHEMA,
        "kind": KIND,
        "host": snapshot.host,
        "boot_time": snapshot.boot_time,
        "boot_id": snapshot.boot_id,
        "taken_at": snapshot.taken_at,
        "source": snapshot.source,
        "policy": str(policy),
        "warnings": list(snapshot.warnings),
        "workers": [
            {
                "node": w.node,
                "app": w.app,
                "program": w.program,
                "supervisor_pid": w.supervisor_pid,
                "main": w.main.pid,
                "procs": [proc_to_dict(p) for p in w.procs],
                "tasks": [asdict(t) for t in w.tasks],
                "cgroup": w.cgroup.to_dict() if w.cgroup else None,
                "cgroup_reason": w.cgroup_reason,
            }
            for w in snapshot.workers
        ],
        "verdicts": [
            {"pid": v.proc.pid, "create_time": v.proc.create_time, "action": v.action, "reason": v.reason}
            for v in verdicts
        ],
    }
    if supervisor is not None:
        doc["supervisor"] = {"pid": supervisor.pid, "create_time": supervisor.create_time}
    return doc


def write(path: str, document: dict, encoder: type[json.JSONEncoder] = json.JSONEncoder) -> None:
    """Write *document* to *path* atomically with mode 0600.

    *encoder* writes what plain JSON cannot: task arguments, whose encoding
    is the Celery side's (:class:`celery_supervise.celery_side.task_json.Encoder`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    data = json.dumps(document, indent=1, sort_keys=True, cls=encoder).encode()
    try:
        # mkstemp creates the file 0600 in the target folder, so the rename
        # below stays on one filesystem and is atomic.
        fd, tmp = tempfile.mkstemp(prefix=".celery-supervise-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise StateFileError(path, f"cannot write: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StateFileError(path, f"cannot write: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------- read


def read_bytes(path: str) -> bytes:
    """Open *path* safely and return its bytes, after the ownership checks.

    The checks run on the open descriptor, not the name, so the file cannot
    be swapped between check and read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise StateFileError(path, "no such file") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: O_NOFOLLOW met a symlink
            raise UnsafeStateError(path, "is a symbolic link; refusing to follow it") from None
        raise StateFileError(path, f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError(path, "is not a regular file")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeStateError(
                path, f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}); refusing to trust it"
            )
        euid = os.geteuid()
        if st.st_uid != euid:
            who = "root" if euid == 0 else f"uid {euid}"
            raise UnsafeStateError(path, f"is owned by uid {st.st_uid}, not {who}; refusing to trust it")
        check_folder(path)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_folder(path: str) -> None:
    """Refuse a file (existing or not) whose folder others may write without the sticky bit.

    There anyone with write access can rename our file away and put another
    in its place: one of their own is refused by the owner check, but an
    older file of ours (a previous deploy's record, renamed in) is not. A
    sticky folder such as /tmp lets only a file's owner rename or remove it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise StateFileError(path, f"cannot check its folder: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UnsafeStateError(
            path, f"is in {folder}, which others may write (mode {stat.S_IMODE(st.st_mode):04o}, "
            "no sticky bit); refusing to trust it"
        )


def read_here(path: str) -> Record | LegacyRecord:
    """Read *path* as this host, this boot and this PID namespace see it."""
    return read(path, host=hostname(), boot_time=procs.boot_time(), boot_id=procs.boot_id(),
                init=procs.read_proc(1))


def read(path: str, *, host: str, boot_time: float, boot_id: str | None,
         init: Proc | None = None) -> Record | LegacyRecord:
    """Read and validate a state file written on *host* during boot *boot_id*.

    *boot_time* is the base the reader computes creation times with
    (:func:`celery_supervise.processes.procs.boot_time`); the record's are rebased to it.
    *init* is PID 1 as the reader sees it (``None``: unknown); a record may
    name it as its supervisord only if it runs supervisord.
    """
    data = read_bytes(path)
    if not data.strip():
        raise StateFileError(path, "is empty")
    if LEGACY_PIDS.match(data):
        return LegacyRecord(tuple(_pid(path, "PID list", _legacy_int(path, x)) for x in data.split()))
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: arrays or objects nested deeper than the interpreter's stack.
        raise StateFileError(
            path, "is neither a celery-supervise state file (not valid JSON; truncated?) nor a list of PIDs"
        ) from None
    return parse(path, doc, host=host, boot_time=boot_time, boot_id=boot_id, init=init)


def parse(path: str, doc: Any, *, host: str, boot_time: float, boot_id: str | None,
          init: Proc | None = None) -> Record:
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise StateFileError(path, "is not a celery-supervise state file")
    if doc.get("schema") != SCHEMA:
        raise StateFileError(path, f"has unknown schema version {doc.get('schema')!r} (this tool reads {SCHEMA})")
    if doc.get("host") != host:
        raise UnsafeStateError(path, f"was written on host {doc.get('host')!r}, this is {host!r}")
    recorded_boot = _number(path, "boot_time", doc.get("boot_time"))
    recorded_id = doc.get("boot_id")
    if recorded_id is not None and not isinstance(recorded_id, str):
        raise StateFileError(path, f"boot_id: {recorded_id!r} is not a string")
    if recorded_id and boot_id:
        if recorded_id != boot_id:
            raise UnsafeStateError(path, "was written before the last boot (its boot id differs); "
                                   "its PIDs mean nothing now")
    elif abs(recorded_boot - boot_time) > BOOT_TIME_TOLERANCE:
        raise UnsafeStateError(path, "was written before the last boot (or the clock was set by more than "
                               f"{BOOT_TIME_TOLERANCE:g}s since, and the file has no boot id to tell); "
                               "its PIDs mean nothing now")
    # Same boot: the creation times were computed with the writer's btime.
    # Moved onto ours, they equal what we compute for the same processes.
    shift = boot_time - recorded_boot
    try:
        policy = Policy.parse(doc.get("policy"))
    except Exception:
        raise StateFileError(path, f"has an invalid policy {doc.get('policy')!r}") from None
    workers = doc.get("workers")
    if not isinstance(workers, list):
        raise StateFileError(path, "has no workers list")
    verdicts = doc.get("verdicts", [])
    if not isinstance(verdicts, list):
        raise StateFileError(path, "verdicts is not a list")
    warnings = doc.get("warnings", [])
    supervisor = _supervisor(doc.get("supervisor"), shift)
    init_check = _InitCheck(path, init, supervisor[1] if supervisor and supervisor[0] == 1 else None)
    if supervisor and supervisor[0] == 1:
        init_check("supervisor.pid")
    snapshot = Snapshot(
        host=host,
        boot_time=boot_time,
        taken_at=_number(path, "taken_at", doc.get("taken_at")),
        workers=tuple(_rebased(_worker(path, i, w, init_check), shift) for i, w in enumerate(workers)),
        source=str(doc.get("source", "?")),
        warnings=tuple(str(w) for w in warnings) if isinstance(warnings, list) else (),
        boot_id=recorded_id,
    )
    verdicts = tuple(
        {**v, "create_time": v["create_time"] + shift} if isinstance(v.get("create_time"), (int, float)) else v
        for v in verdicts if isinstance(v, dict)
    )
    return Record(snapshot, policy, verdicts, supervisor, shift)


def _rebased(worker: Worker, shift: float) -> Worker:
    if not shift:
        return worker
    moved = tuple(replace(p, create_time=p.create_time + shift) for p in worker.procs)
    return replace(worker, main=moved[0], procs=moved)


def _supervisor(value: Any, shift: float) -> tuple[int, float] | None:
    """The listener's record of its supervisord (which may well be PID 1 in a container).

    Only ever compared with live processes, never signalled; a malformed
    one counts as unknown, as it always has.
    """
    try:
        pid, create_time = value["pid"], value["create_time"]
    except (TypeError, KeyError):
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or isinstance(create_time, bool) \
            or not isinstance(create_time, (int, float)):
        return None
    return pid, float(create_time) + shift


@dataclass(frozen=True)
class _InitCheck:
    """Whether PID 1 may be named as a record's supervisord; raises if not.

    Only when PID 1, in the reader's PID namespace, runs supervisord: in a
    container whose PID 1 is supervisord, that is where its programs'
    records come from. Elsewhere (systemd, tini, another container's
    numbers) the record's PIDs mean something else, or nothing, here. A
    listener's record also carries its supervisord's creation time
    (*create_time*, rebased); PID 1 must be that very process, not the
    supervisord of an earlier container that wrote into the same folder.
    """

    path: str
    init: Proc | None
    create_time: float | None = None

    def __call__(self, where: str) -> int:
        init = self.init
        if init is None or not procs.runs_supervisord(init.cmdline):
            what = "cannot be read" if init is None else f"runs {init.name!r}"
            raise UnsafeStateError(self.path, f"{where}: names PID 1 as its supervisord, but PID 1 here {what}, "
                                   "not supervisord; refusing")
        if self.create_time is not None and not init.same_process(self.create_time):
            raise UnsafeStateError(self.path, f"{where}: names PID 1 as its supervisord, but the supervisord that is "
                                   "PID 1 here is another one (started at another time: an earlier container's "
                                   "record?); refusing")
        return 1


def _pid(path: str, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateFileError(path, f"{where}: PID {value!r} is not a number")
    if value <= 0:
        raise UnsafeStateError(path, f"{where}: PID {value} is not positive")
    if value == 1:
        raise UnsafeStateError(path, f"{where}: names PID 1; refusing")
    return value


def _legacy_int(path: str, word: bytes) -> int:
    try:
        return int(word)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        raise StateFileError(path, f"PID list: a number of {len(word)} digits is not a PID") from None


def _number(path: str, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StateFileError(path, f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    # json.loads reads NaN and Infinity; a NaN compares false with everything,
    # so a NaN boot_time would pass the "written before the last boot" check.
    if not math.isfinite(number):
        raise StateFileError(path, f"{where}: {value!r} is not a finite number")
    return number


def _int(path: str, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateFileError(path, f"{where}: {value!r} is not an integer")
    return value


def _proc(path: str, where: str, d: Any) -> Proc:
    if not isinstance(d, dict):
        raise StateFileError(path, f"{where}: not an object")
    role = d.get("role")
    if role not in ROLES:
        raise StateFileError(path, f"{where}: unknown role {role!r}")
    cmdline = d.get("cmdline", [])
    if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
        raise StateFileError(path, f"{where}: cmdline is not a list of strings")
    return Proc(
        pid=_pid(path, where, d.get("pid")),
        ppid=_int(path, f"{where}.ppid", d.get("ppid")),
        create_time=_number(path, f"{where}.create_time", d.get("create_time")),
        pgid=_pid(path, f"{where}.pgid", d.get("pgid")),
        sid=_int(path, f"{where}.sid", d.get("sid")),
        uid=_int(path, f"{where}.uid", d.get("uid")),
        cmdline=tuple(cmdline),
        sighup_ignored=bool(d.get("sighup_ignored")),
        role=role,
    )


def _worker(path: str, i: int, d: Any, init_check: _InitCheck) -> Worker:
    where = f"workers[{i}]"
    if not isinstance(d, dict):
        raise StateFileError(path, f"{where}: not an object")
    raw = d.get("procs")
    if not isinstance(raw, list) or not raw:
        raise StateFileError(path, f"{where}: has no processes")
    plist = tuple(_proc(path, f"{where}.procs[{j}]", p) for j, p in enumerate(raw))
    main = plist[0]
    if main.role != "main" or d.get("main") != main.pid:
        raise StateFileError(path, f"{where}: the first process is not the worker's main process")
    tasks = d.get("tasks", [])
    if not isinstance(tasks, list):
        raise StateFileError(path, f"{where}: tasks is not a list")
    sup = d.get("supervisor_pid")
    if sup is not None:
        at = f"{where}.supervisor_pid"
        sup = init_check(at) if type(sup) is int and sup == 1 else _pid(path, at, sup)
    return Worker(
        main=main,
        procs=plist,
        node=_opt_str(d.get("node")),
        app=_opt_str(d.get("app")),
        program=_opt_str(d.get("program")),
        supervisor_pid=sup,
        tasks=tuple(Task.from_reply(t) for t in tasks if isinstance(t, dict)),
        # A malformed cgroup is not trusted: the kill falls back to the tree and the group.
        cgroup=Cgroup.from_dict(d.get("cgroup")),
        cgroup_reason=_opt_str(d.get("cgroup_reason")),
    )


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
