"""Reading live processes into frozen records.

This is the only module that looks at ``/proc`` and psutil to describe a
process. Everything downstream (planning, reports, state files) works on the
plain :class:`Proc` records it returns.

A process is identified by PID *plus* creation time, as psutil does: the pair
survives PID reuse, the PID alone does not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Container, Iterable, Iterator

import psutil

from .boottime import BOOT_ID_PATH, boot_id, boot_time, read_btime  # noqa: F401  (procs.* is the API)

# Roles a process can play inside a worker's tree.
MAIN = "main"
POOL = "pool"
TASK = "task"  # anything below the main or a pool process
ROLES = (MAIN, POOL, TASK)

SIGHUP_BIT = 1 << 0  # signal 1, bit 0 of the SigIgn mask

# Two different processes holding one PID are at least one clock tick (10 ms)
# apart in creation time; a JSON round trip of the float is exact, so this
# tolerance only absorbs psutil's own float arithmetic.
CREATE_TIME_TOLERANCE = 0.005


@dataclass(frozen=True)
class Proc:
    """One process as seen at one instant."""

    pid: int
    ppid: int
    create_time: float
    pgid: int
    sid: int
    uid: int
    cmdline: tuple[str, ...]
    sighup_ignored: bool
    role: str = TASK

    @property
    def name(self) -> str:
        return os.path.basename(self.cmdline[0]) if self.cmdline else "?"

    @property
    def command(self) -> str:
        return " ".join(self.cmdline) if self.cmdline else "?"

    def with_role(self, role: str) -> "Proc":
        return replace(self, role=role)

    @property
    def identity(self) -> Identity:
        return Identity(self.pid, self.create_time)

    def same_process(self, other: "Proc | psutil.Process | float") -> bool:
        """True when *other* is this very process, not a PID reuse."""
        create_time = other if isinstance(other, float) else other.create_time
        if callable(create_time):
            create_time = create_time()
        return abs(create_time - self.create_time) <= CREATE_TIME_TOLERANCE


@dataclass(frozen=True)
class Identity:
    """A process as PID plus creation time: what tells it from a later process given the same PID.

    psutil's ``is_running()`` works the same way. A record's creation time
    is rebased to this boot's clock, so two are the same within
    :data:`CREATE_TIME_TOLERANCE`, not bit for bit.
    """

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> "Identity | None":
        """The live process *pid* now; ``None`` if it is gone (or a zombie)."""
        ct = live_identity(pid)
        return None if ct is None else cls(pid, ct)

    def same(self, other: "Identity | None") -> bool:
        return other is not None and other.pid == self.pid \
            and abs(other.create_time - self.create_time) <= CREATE_TIME_TOLERANCE

    def alive(self) -> bool:
        """Whether this very process still runs (not a PID reuse)."""
        return self.same(Identity.of(self.pid))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


_FILE = os.O_RDONLY | os.O_CLOEXEC


def _read(path: str) -> bytes:
    # Raw os.open/os.read: no buffered file object per read, which is a
    # third of the cost of a walk over a large tree. One read is enough for
    # nearly every file here; a longer one (a long command line) loops.
    fd = os.open(path, _FILE)
    try:
        data = os.read(fd, _CHUNK)
        if len(data) < _CHUNK:
            return data
        chunks = [data]
        while len(chunks[-1]) == _CHUNK:
            chunks.append(os.read(fd, _CHUNK))
        return b"".join(chunks)
    finally:
        os.close(fd)


_CHUNK = 8192
_PAGE = 4096
_CHILD_ENTRY_ROOM = 64  # several entries' worth, beyond the 8 bytes one takes


def _read_children(path: str) -> bytes:
    """A ``children`` file, whole.

    Unlike ``stat`` or ``status``, it is produced a page at a time: each
    read returns at most 4,096 bytes however much is asked for, so a read
    shorter than asked is not the end. Stopping there would lose every
    child after the first 682 or so (5-digit PIDs). Read until EOF.
    """
    fd = os.open(path, _FILE)
    try:
        chunk = os.read(fd, _CHUNK)
        # The page is filled with whole entries (a PID and a space, at most
        # 8 bytes: pid_max is at most 2**22). A page left with room for
        # several more entries was the last: skip the read that would
        # return b"" (a thousand system calls on a 1,000-process tree).
        if len(chunk) < _PAGE - _CHILD_ENTRY_ROOM:
            return chunk
        chunks = [chunk]
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# Field indexes in /proc/PID/stat, counted from the state (the first field
# after the command name): proc(5)'s field number minus 3.
_STATE, _PPID, _PGID, _SID, _THREADS, _START, _SIGIGNORE = 0, 1, 2, 3, 17, 19, 30


def _stat_fields(data: bytes, last: int = _SIGIGNORE) -> list[bytes]:
    # The command name in parentheses may itself contain spaces and
    # parentheses, so the fields are counted from the *last* ``)``. Only
    # the fields up to *last* are split off: the line has some fifty.
    return data[data.rindex(b")") + 2:].split(None, last + 1)


def parse_stat(data: bytes) -> tuple[str, int, int, int, int]:
    """(state, ppid, pgid, sid, starttime ticks) from ``/proc/PID/stat``."""
    fields = _stat_fields(data, _START)
    return (fields[_STATE].decode(), int(fields[_PPID]), int(fields[_PGID]), int(fields[_SID]),
            int(fields[_START]))


def parse_cmdline(data: bytes) -> tuple[str, ...]:
    """Split ``/proc/PID/cmdline`` exactly as psutil does.

    Arguments are NUL-separated, but a process that rewrote its title
    (setproctitle) may use spaces instead.
    """
    text = data.decode("utf-8", "surrogateescape")
    if not text:
        return ()
    sep = "\0" if text.endswith("\0") else " "
    if text.endswith(sep):
        text = text[:-1]
    args = text.split(sep)
    if sep == "\0" and len(args) == 1 and " " in text:
        args = text.split(" ")
    return tuple(args)


def create_time_of(starttime_ticks: int) -> float:
    """psutil's own formula, so our identities equal ``Process.create_time()``
    (as long as the clock has not been set since :func:`boot_time` was read)."""
    return starttime_ticks / CLOCK_TICKS + boot_time()


def read_proc(pid: int, role: str = TASK) -> Proc | None:
    """Snapshot one process, or ``None`` if it is gone (or a zombie).

    Two files and the owner of ``/proc/PID`` are read directly rather than
    through ``psutil.Process``: a worker tree can hold a thousand processes
    and psutil's per-process overhead (object set-up, reuse checks, a file
    read per accessor) costs about 230 us each against about 35 us here
    (see :func:`_read_family`). The values are the ones psutil computes;
    ``create_time_of`` uses psutil's formula with a boot time read once.

    A zombie has already exited: signalling it does nothing and it has no
    children left, so for our purposes it is gone.
    """
    found = read_proc_threads(pid, role)
    return None if found is None else found[0]


def read_proc_threads(pid: int, role: str = TASK) -> tuple[Proc, int] | None:
    """:func:`read_proc`, plus the process's thread count (for :func:`child_pids`)."""
    found = _read_family(pid, role)
    return None if found is None else (found[0], found[1])


def _read_family(pid: int, role: str = TASK, cmdlines: dict | None = None,
                 children: bool = False) -> tuple[Proc, int, list[int]] | None:
    """(record, thread count, children if asked) of *pid*; ``None`` if it is gone or a zombie.

    ``SigIgn`` comes from ``/proc/PID/stat`` (its ``sigignore`` field holds
    the same mask as ``status`` for the classic signals, SIGHUP among
    them). The uid is the owner of ``/proc/PID``, one ``stat`` call instead
    of generating and reading ``status`` (which the kernel builds with the
    memory figures: 40 % of a walk's time). That owner is the process's
    effective uid (the kernel exempts the directory from the non-dumpable
    rule that makes root own the files in it); ``status``'s first ``Uid``
    field is the real uid. Nothing decides by the uid (see
    docs/threat-model.md): it is recorded for the reader of the record.

    Races, as the process may exit at any point: ``stat`` read, it was live
    (or a zombie: ``None``), and that read is the identity. Gone before any
    later read (ENOENT, ESRCH), it is gone as if we had come a moment later
    (``None``); exiting but not yet reaped, its command line and children
    read empty, and its record stands for a process that was live. The
    files are read by path, so a PID freed and handed to another process
    between two reads would mix two processes; PIDs are handed out in
    turn, so that takes pid_max (32,768 or more) forks within these few
    microseconds. (An ``O_PATH`` handle on ``/proc/PID`` would pin the
    process, at two more system calls: 3-8 % of a 1,000-process walk.)

    *cmdlines* memoizes :func:`parse_cmdline` over one walk: the pool
    processes share the main's command line, tasks often share theirs.
    """
    base = f"/proc/{pid}/"
    try:
        fields = _stat_fields(_read(base + "stat"))
        if fields[_STATE] == b"Z":
            return None
        uid = os.stat(base).st_uid
        try:
            raw = _read(base + "cmdline")
        except PermissionError:
            raw = b""
        threads = int(fields[_THREADS])
        if not children:
            kids = []
        elif threads == 1:  # child_pids, inlined for the common case (one thread)
            kids = list(map(int, _read_children(f"{base}task/{pid}/children").split()))
        else:
            kids = child_pids(pid, threads)
    except (FileNotFoundError, ProcessLookupError):
        return None
    cmdline = cmdlines.get(raw) if cmdlines is not None else None
    if cmdline is None:
        cmdline = parse_cmdline(raw)
        if cmdlines is not None:
            cmdlines[raw] = cmdline
    # Built without the dataclass __init__, whose frozen-field guard costs
    # three times as much (about 2 us a process, 5 % of a walk). The fields
    # are the same, and __init__ does nothing else (no __post_init__).
    proc = _new(Proc)
    proc.__dict__.update(
        pid=pid,
        ppid=int(fields[_PPID]),
        create_time=create_time_of(int(fields[_START])),
        pgid=int(fields[_PGID]),
        sid=int(fields[_SID]),
        uid=uid,
        cmdline=cmdline,
        sighup_ignored=bool(int(fields[_SIGIGNORE]) & SIGHUP_BIT),
        role=role,
    )
    return proc, threads, kids


_new = object.__new__


def child_pids(pid: int, threads: int = 0) -> list[int]:
    """Direct children of *pid*, from ``/proc/PID/task/*/children``.

    psutil's ``children()`` scans every process on the machine to find
    them; these files cost only what the tree costs. A child forked while we
    read may be missed; callers that must not miss late births (the kill)
    also scan the worker's process group.

    Each thread lists the children it forked itself. With *threads* = 1 (as
    :func:`read_proc_threads` read it) the main thread's file is the only
    one, and the listing of ``task/`` is skipped; 0 means unknown.
    """
    if threads == 1:
        try:
            return list(map(int, _read_children(f"/proc/{pid}/task/{pid}/children").split()))
        except (FileNotFoundError, ProcessLookupError):
            return []
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return kids
    for tid in tids:
        try:
            kids.extend(map(int, _read_children(f"/proc/{pid}/task/{tid}/children").split()))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread or the process exited meanwhile
    return kids


def walk(root: Proc, *, threads: int = 0, skip: Container[int] = frozenset()) -> Iterator[Proc]:
    """Yield *root*'s live descendants, parents before children.

    Each child is checked against its parent's identity: a child whose
    parent was replaced meanwhile is not ours. PIDs in *skip* (processes
    the caller already holds) are neither read nor descended into, and
    *threads* is *root*'s thread count when known (see :func:`child_pids`).

    A process's children are read right after it (:func:`_read_family`),
    not when its turn on the stack comes: the same file, a moment earlier.
    A child forked after that is missed, as if it had forked a moment later.
    """
    cmdlines: dict[bytes, tuple[str, ...]] = {}
    stack = [(root.pid, child_pids(root.pid, threads))]
    while stack:
        parent, kids = stack.pop()
        for kid in kids:
            if kid in skip:
                continue
            found = _read_family(kid, cmdlines=cmdlines, children=True)
            # A PID listed as our child must still name our child when read.
            if found is None or found[0].ppid != parent:
                continue
            yield found[0]
            stack.append((kid, found[2]))


def tree_grew(recorded: Iterable[Proc]) -> bool:
    """Whether a walk of the tree now could find a process that *recorded* lacks.

    The listener asks this every couple of seconds for every worker it
    watches, so it reads only two small files per recorded process
    (``stat``, for the identity and the thread count, and the ``children``
    files) instead of walking and reading the whole tree again. True (walk
    again) also whenever it cannot tell.

    Why this misses nothing a walk would find: let X be a process a walk
    made now would yield and the record lacks, the one nearest the main.
    Its parent Y is the main or a process the walk yielded, so Y is in the
    record (X is the nearest new one) and is still that very process. We
    read Y's ``children``, which name X: either X's PID is not in the
    record (True), or the record holds that PID for another process, whose
    PID X now reuses, and then that PID's ``stat`` shows another creation
    time (True). Races are the walk's own: a fork after we read its
    parent's ``children`` is seen at the next call, as a walk would see it
    only at its next run; a child whose parent exits before then is
    re-parented out of the tree, where no walk from the main finds it
    either (the kill's process-group scan is what catches those).
    A recorded process that died is no change: records keep the dead, and
    a dead process has no children left.
    """
    procs = list(recorded)
    pids = {p.pid for p in procs}
    for p in procs:
        try:
            fields = _stat_fields(_read(f"/proc/{p.pid}/stat"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # it died: nothing of its own to add
        except OSError:
            return True
        if fields[_STATE] == b"Z":
            continue
        if not p.same_process(create_time_of(int(fields[_START]))):
            return True  # the PID names another process now
        try:
            kids = child_pids(p.pid, int(fields[_THREADS]))
        except OSError:  # not readable for us (hidepid, another user): walk
            return True
        if any(kid not in pids for kid in kids):
            return True
    return False


def live_identity(pid: int) -> float | None:
    """Creation time of the live process *pid*, or ``None`` if it is gone.

    One read of ``/proc/PID/stat``: this runs before the first signal to
    every target of a kill, and on every poll of a wait for unpinned ones.
    """
    try:
        fields = _stat_fields(_read(f"/proc/{pid}/stat"), _START)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[_STATE] == b"Z" else create_time_of(int(fields[_START]))


def pids_in_group(pgid: int) -> list[int]:
    """PIDs whose process group is *pgid* (a scan of every process).

    ``getpgid`` is one syscall per PID, far cheaper than psutil's
    ``process_iter`` with attributes.
    """
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                found.append(pid)
        except ProcessLookupError:
            continue
    return found


def ancestors(pid: int) -> list[int]:
    """PIDs of *pid*'s ancestors, nearest first (ends at PID 1 or 0)."""
    try:
        return [p.pid for p in psutil.Process(pid).parents()]
    except psutil.NoSuchProcess:
        return []


def runs_supervisord(cmdline: Iterable[str]) -> bool:
    """Whether *cmdline* runs supervisord.

    ``supervisord …``, ``python …/supervisord …`` (its console script) and
    ``python -m supervisor.supervisord …``.
    """
    head = list(cmdline)[:3]
    if any(os.path.basename(a) == "supervisord" for a in head[:2]):
        return True
    return head[1:3] == ["-m", "supervisor.supervisord"]


def iter_cmdlines(containing: bytes = b"") -> Iterable[tuple[int, int, tuple[str, ...]]]:
    """(pid, ppid, cmdline) of every readable process whose command line contains *containing*.

    Only ``/proc/PID/cmdline`` is read for every process; the parent is read
    only for the matches. A scan for workers or supervisords runs on every
    savepid and kill, over however many processes the machine has.
    """
    for pid in psutil.pids():
        try:
            raw = _read(f"/proc/{pid}/cmdline")
            if containing not in raw:
                continue
            _state, ppid, _pgid, _sid, _start = parse_stat(_read(f"/proc/{pid}/stat"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        yield pid, ppid, parse_cmdline(raw)
