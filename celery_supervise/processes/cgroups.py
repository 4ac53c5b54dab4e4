"""Per-worker cgroup v2 tracking: what a task child cannot leave.

A task's child can leave both the worker's tree and its process group
without a new session: a double fork whose grandchild calls ``setpgid``,
``Popen(process_group=0)``, a shell with job control (``set -m``), or a
pool process replaced by ``--max-tasks-per-child`` whose children were
re-parented. Nothing the tree walk or the group scan sees still leads to
it. Its cgroup does: a process is born in its parent's cgroup and only a
writer of cgroup files can move it out, so every descendant forked after
the worker was placed in a cgroup of its own is a member, whatever
``setsid``/``setpgid``/double fork it did.

Layout, nested under supervisord's own v2 cgroup so that it follows a
delegation (systemd ``Delegate=yes``) and never reaches outside it::

    <v2 mount><supervisord's cgroup>/celery-supervise/
        <program>@<pid>.<starttime ticks>[.late]   one per placed worker
        detached/                                  spared members, moved out before the rmdir

Membership is only ever *data* fed to the snapshot; the plan decides on
members by the usual rules (a member in a new session, or that ignores
SIGHUP, is detached and spared). ``cgroup.kill`` and ``cgroup.freeze`` are
never used: they would hit the detached members too.

This module is in the process layer: it imports neither Celery nor
supervisor. See docs/escapes.md for the measurements behind it.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Container, Iterable

from . import procs
from .procs import Proc

BASE_NAME = "celery-supervise"
DETACHED = "detached"
LATE_SUFFIX = ".late"
AUTO, OFF = "auto", "off"
MODES = (AUTO, OFF)

MOUNTINFO = "/proc/self/mountinfo"

#: What status says for a worker nobody placed on a host where cgroups work.
NOT_PLACED = ("not placed in a cgroup (run the listener, or start the worker through "
              "`celery-supervise contain --`)")

_NAME_RE = re.compile(r"^(?P<program>.+)@(?P<pid>[0-9]+)\.(?P<ticks>[0-9]+)(?P<late>\.late)?$")


class CgroupUnavailable(Exception):
    """Tracking cannot be set up here; ``str()`` is the reason status shows.

    Never reaches a shell as an error: every caller degrades to the tree
    and the process group, and says so.
    """


@dataclass(frozen=True)
class Cgroup:
    """One worker's cgroup, as recorded.

    *path* is relative to the v2 mount (``/celery-supervise/w@12.345``),
    *inode* the cgroup directory's inode number (the kernel's cgroup id,
    unique for the boot): a directory with the same name and another inode
    is a replacement, not ours. *late* means the worker was placed after it
    started: children forked before that are not covered.
    """

    path: str
    inode: int
    late: bool = False

    def to_dict(self) -> dict:
        return {"path": self.path, "inode": self.inode, "late": self.late}

    @classmethod
    def from_dict(cls, value) -> "Cgroup | None":
        """A recorded cgroup, or ``None`` for anything malformed (then never trusted)."""
        if not isinstance(value, dict):
            return None
        path, inode = value.get("path"), value.get("inode")
        if not isinstance(path, str) or worker_cgroup(path) != path:
            return None
        if isinstance(inode, bool) or not isinstance(inode, int) or inode <= 0:
            return None
        return cls(path, inode, bool(value.get("late")))


# ------------------------------------------------------------------ pure parts


def v2_mount(mountinfo: str) -> tuple[str, bool] | None:
    """The first cgroup2 mount in a ``/proc/self/mountinfo`` text: (mount point, read-only)."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) >= 6 and tail and tail[0] == "cgroup2":
            options = set(fields[5].split(",")) | set(tail[-1].split(","))
            return fields[4].replace("\\040", " "), "ro" in options
    return None


def v2_path(proc_cgroup: str) -> str | None:
    """The v2 path in a ``/proc/PID/cgroup`` text (its ``0::`` line), else ``None``."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def worker_cgroup(path: str) -> str | None:
    """*path* if it names a worker's cgroup (``…/celery-supervise/<program>@<pid>.<ticks>``), else ``None``."""
    parent, _, leaf = path.rstrip("/").rpartition("/")
    if parent.rpartition("/")[2] != BASE_NAME or not _NAME_RE.match(leaf):
        return None
    return path.rstrip("/")


def cgroup_name(program: str, pid: int, ticks: int, late: bool = False) -> str:
    """``<program>@<pid>.<starttime ticks>``: unique for the boot, like the process it names."""
    safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", program) or "_"
    return f"{safe}@{pid}.{ticks}" + (LATE_SUFFIX if late else "")


def base_of(parent: str) -> str:
    """The base folder (relative to the mount) under a parent cgroup path."""
    # A parent that is itself one of ours (a contained process placing a
    # worker): nest beside it, not inside it.
    if worker_cgroup(parent):
        return parent.rpartition("/")[0]
    if parent.rstrip("/").rpartition("/")[2] == BASE_NAME:
        return parent.rstrip("/")
    return parent.rstrip("/") + "/" + BASE_NAME


def escaped(main: Proc, members: Iterable[Proc], known: Container[int] = ()) -> list[Proc]:
    """The members of *main*'s cgroup that the tree and group scan did not find.

    A member born before the worker (a wrapper shell the program ran
    without ``exec``) is its ancestor, not its child, and never counts.
    """
    return [p for p in members if p.pid not in known and p.pid != main.pid and p.create_time >= main.create_time]


def describe(cgroup: Cgroup | None, reason: str | None) -> str:
    """The one line ``status`` prints for a worker: which mechanism is in force."""
    if cgroup is None:
        return f"process group only: {reason or NOT_PLACED}"
    return f"cgroup {cgroup.path}" + (" (placed late: children forked before that are not covered)"
                                      if cgroup.late else "")


# -------------------------------------------------------------- reading /proc


def mount() -> tuple[str, bool] | None:
    try:
        with open(MOUNTINFO) as f:
            return v2_mount(f.read())
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """*pid*'s start time in clock ticks since boot (its identity, as a cgroup name carries it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return procs.parse_stat(f.read())[4]
    except OSError:
        return None


def path_of(pid: int) -> str | None:
    """The v2 cgroup path of *pid*, ``None`` if it is gone or has none."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return v2_path(f.read())
    except OSError:
        return None


def _inode(absolute: str) -> int | None:
    try:
        return os.stat(absolute).st_ino
    except OSError:
        return None


def unavailable(mode: str = AUTO) -> str | None:
    """Why tracking cannot work on this host at all, or ``None``."""
    if mode == OFF:
        return "off (--cgroups off)"
    found = mount()
    if found is None:
        return "no cgroup v2 mount on this host"
    return None


def of_worker(pid: int, mode: str = AUTO) -> tuple[Cgroup | None, str | None]:
    """The cgroup *pid* (a worker main) was placed in, else ``(None, why not)``."""
    why = unavailable(mode)
    if why:
        return None, why
    path = path_of(pid)
    if path is None:
        return None, f"cannot read /proc/{pid}/cgroup"
    path = worker_cgroup(path)
    if path is None:
        return None, NOT_PLACED
    inode = _inode(mount()[0] + path)
    if inode is None:
        return None, f"its cgroup {path} cannot be read"
    return Cgroup(path, inode, path.endswith(LATE_SUFFIX)), None


def members(cgroup: Cgroup) -> tuple[list[int] | None, str | None]:
    """PIDs in *cgroup* now; ``(None, why)`` when it cannot be trusted.

    A missing folder means no member is left (a populated cgroup cannot
    be removed). A folder with another inode is a replacement: not ours.
    """
    found = mount()
    if found is None:
        return None, "no cgroup v2 mount on this host"
    absolute = found[0] + cgroup.path
    inode = _inode(absolute)
    if inode is None:
        return [], None
    if inode != cgroup.inode:
        return None, (f"cgroup {cgroup.path} was replaced (inode {inode}, recorded {cgroup.inode}); "
                      "not trusted: process group only")
    try:
        with open(os.path.join(absolute, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()], None
    except FileNotFoundError:
        return [], None  # removed between the stat and the read
    except OSError as exc:
        return None, f"cannot read {absolute}/cgroup.procs: {exc.strerror or exc}"


def read_members(cgroup: Cgroup, main: Proc, known: Container[int]) -> tuple[list[Proc], str | None]:
    """The live members of *cgroup* outside *known*, as records (see :func:`escaped`)."""
    pids, why = members(cgroup)
    if pids is None:
        return [], why
    found = (procs.read_proc(pid) for pid in pids if pid not in known)
    return escaped(main, (p for p in found if p is not None), known), None


# ------------------------------------------------------------------- writing


def _write_pid(absolute: str, pid: int) -> None:
    with open(os.path.join(absolute, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def place(pid: int, program: str, *, parent_pid: int, late: bool = False,
          also: Iterable[int] = (), mode: str = AUTO) -> Cgroup:
    """Make *pid*'s cgroup under *parent_pid*'s (supervisord's) and move *pid* into it.

    *also* (a late placement: the worker's current tree) is moved too, so
    that what those processes fork from now on is covered. Raises
    :class:`CgroupUnavailable` with the reason when it cannot be done. A
    *pid* already in a worker cgroup is left where it is (the ``contain``
    wrapper placed itself first, or an earlier event did).
    """
    why = unavailable(mode)
    if why:
        raise CgroupUnavailable(why)
    if pid <= 1 or pid == parent_pid:
        # PID 1 (or supervisord itself) in a worker's cgroup would make everything it forks a "member".
        raise CgroupUnavailable(f"PID {pid} is never placed (PID 1 or supervisord)")
    root, read_only = mount()
    if read_only:
        raise CgroupUnavailable(f"the cgroup v2 mount {root} is read-only")
    already = of_worker(pid, mode)[0]
    if already is not None:
        return already
    parent = path_of(parent_pid)
    if parent is None:
        raise CgroupUnavailable(f"cannot read the cgroup of PID {parent_pid} (supervisord)")
    if parent.startswith("/.."):
        raise CgroupUnavailable(f"supervisord's cgroup {parent} is outside this cgroup namespace")
    if not os.path.isdir(root + parent):
        raise CgroupUnavailable(f"supervisord's cgroup {parent} is not visible under {root} "
                                "(a container without its own cgroup namespace?)")
    base = base_of(parent)
    found = start_ticks(pid)
    if found is None:
        raise CgroupUnavailable(f"PID {pid} is gone")
    path = f"{base}/{cgroup_name(program, pid, found, late)}"
    try:
        os.makedirs(root + base + "/" + DETACHED, exist_ok=True)
        os.makedirs(root + path, exist_ok=True)
        _write_pid(root + path, pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            _rmdir(root + path)
            raise CgroupUnavailable(f"PID {pid} is gone") from None
        raise CgroupUnavailable(f"cannot create or enter {root + path}: {exc.strerror or exc} "
                                "(not root and not delegated?)") from None
    for other in also:
        try:
            _write_pid(root + path, other)
        except OSError:
            pass  # exited meanwhile; anything else it is left out of, as before placement
    inode = _inode(root + path)
    if inode is None:
        raise CgroupUnavailable(f"{root + path} vanished right after it was made")
    return Cgroup(path, inode, late)


def _rmdir(absolute: str) -> bool:
    try:
        os.rmdir(absolute)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def release(cgroup: Cgroup, keep: Iterable[int]) -> list[str]:
    """After a kill: move the spared members *keep* to ``detached``, remove the cgroup.

    Returns warnings. A cgroup that still holds a member we did not spare
    (an attached process that survived, one born after the plan) is kept,
    so a later kill still finds it.
    """
    pids, why = members(cgroup)
    if pids is None:
        return [why] if why else []
    root = mount()[0]
    absolute = root + cgroup.path
    detached = root + cgroup.path.rpartition("/")[0] + "/" + DETACHED
    spared = set(keep)
    left = []
    for pid in pids:
        if pid in spared:
            try:
                os.makedirs(detached, exist_ok=True)
                _write_pid(detached, pid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    left.append(pid)
        else:
            left.append(pid)
    if left:
        # A zombie is not listed, so these live: a re-read tells exits from survivors.
        still, _ = members(cgroup)
        if still:
            return [f"cgroup {cgroup.path} kept: {len(still)} member(s) still in it ({', '.join(map(str, still[:5]))})"]
    if not _rmdir(absolute) and os.path.isdir(absolute):
        return [f"cgroup {cgroup.path} could not be removed"]
    return []


def enter_self(program: str, mode: str = AUTO) -> Cgroup:
    """Place the calling process (the ``contain`` wrapper, before it execs the worker)."""
    # Its parent is supervisord (or a shell supervisord runs): the cgroup we inherited is theirs.
    return place(os.getpid(), program, parent_pid=os.getppid(), mode=mode)
