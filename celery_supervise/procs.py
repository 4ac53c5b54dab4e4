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
from typing import Iterable, Iterator

import psutil

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

    def same_process(self, other: "Proc | psutil.Process | float") -> bool:
        """True when *other* is this very process, not a PID reuse."""
        create_time = other if isinstance(other, float) else other.create_time
        if callable(create_time):
            create_time = create_time()
        return abs(create_time - self.create_time) <= CREATE_TIME_TOLERANCE


def sighup_ignored(pid: int) -> bool:
    """Whether *pid* ignores SIGHUP, from ``SigIgn`` in ``/proc/PID/status``.

    psutil does not expose signal dispositions, so this one field is read
    directly. ``nohup`` works by setting SIGHUP to SIG_IGN before exec, and
    an ignored disposition survives exec, so the bit is how a nohup'd
    descendant is told apart from an attached one.
    """
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"SigIgn:"):
                return bool(int(line.split()[1], 16) & SIGHUP_BIT)
    return False


def read_proc(pid: int, role: str = TASK) -> Proc | None:
    """Snapshot one process, or ``None`` if it is gone (or a zombie).

    A zombie has already exited: signalling it does nothing and it has no
    children left, so for our purposes it is gone.
    """
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            ppid = p.ppid()
            create_time = p.create_time()
            uid = p.uids().real
            try:
                cmdline = tuple(p.cmdline())
            except psutil.AccessDenied:
                cmdline = ()
        pgid = os.getpgid(pid)
        sid = os.getsid(pid)
        ignored = sighup_ignored(pid)
    except (psutil.NoSuchProcess, ProcessLookupError, FileNotFoundError):
        return None
    return Proc(
        pid=pid,
        ppid=ppid,
        create_time=create_time,
        pgid=pgid,
        sid=sid,
        uid=uid,
        cmdline=cmdline,
        sighup_ignored=ignored,
        role=role,
    )


def child_pids(pid: int) -> list[int]:
    """Direct children of *pid*, from ``/proc/PID/task/*/children``.

    psutil's ``children()`` scans every process on the machine to find
    them; these files cost only what the tree costs. A child forked while we
    read may be missed; callers that must not miss late births (the kill)
    also scan the worker's process group.
    """
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread or the process exited meanwhile
    return kids


def walk(root: Proc) -> Iterator[Proc]:
    """Yield *root*'s live descendants, parents before children.

    Each child is checked against its parent's identity: a child whose
    parent was replaced meanwhile is not ours.
    """
    stack = [root]
    while stack:
        parent = stack.pop()
        for kid in child_pids(parent.pid):
            proc = read_proc(kid)
            # A PID listed as our child must still name our child when read.
            if proc is None or proc.ppid != parent.pid:
                continue
            yield proc
            stack.append(proc)


def live_identity(pid: int) -> float | None:
    """Creation time of the live process *pid*, or ``None`` if it is gone."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except psutil.NoSuchProcess:
        return None


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


def boot_time() -> float:
    return psutil.boot_time()


def iter_cmdlines() -> Iterable[tuple[int, int, tuple[str, ...]]]:
    """(pid, ppid, cmdline) of every process we may read."""
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        info = p.info
        yield info["pid"], info["ppid"] or 0, tuple(info["cmdline"] or ())
