"""Snapshots: frozen records of every local worker's process tree.

Step one of snapshot -> plan -> act. :func:`take` reads the live trees of
the worker main processes that discovery found; the result is plain data
that :mod:`celery_supervise.processes.plan` decides on and
:mod:`celery_supervise.processes.statefile` stores.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import procs
from .cgroups import Cgroup
from .procs import MAIN, POOL, TASK, Proc


@dataclass(frozen=True)
class Task:
    """A task a worker reported as active (``inspect().active()``)."""

    id: str
    name: str
    args: Any = ()
    kwargs: Any = field(default_factory=dict)
    delivery_info: dict = field(default_factory=dict)
    worker_pid: int | None = None
    acknowledged: bool | None = None
    time_start: float | None = None
    hostname: str | None = None

    @classmethod
    def from_reply(cls, reply: dict) -> "Task":
        return cls(
            id=str(reply.get("id")),
            name=str(reply.get("name") or reply.get("type") or "?"),
            args=reply.get("args", ()),
            kwargs=reply.get("kwargs", {}),
            delivery_info=reply.get("delivery_info") or {},
            worker_pid=reply.get("worker_pid"),
            acknowledged=reply.get("acknowledged"),
            time_start=reply.get("time_start"),
            hostname=reply.get("hostname"),
        )


@dataclass(frozen=True)
class Worker:
    """One Celery worker: its main process and everything below it."""

    main: Proc
    procs: tuple[Proc, ...]  # main first, then parents before children
    node: str | None = None
    app: str | None = None
    program: str | None = None  # supervisord's process name, when known
    supervisor_pid: int | None = None
    tasks: tuple[Task, ...] = ()
    # The worker's own cgroup (see celery_supervise.cgroups), or why there is none.
    cgroup: Cgroup | None = None
    cgroup_reason: str | None = None

    def by_pid(self) -> dict[int, Proc]:
        return {p.pid: p for p in self.procs}

    def already_orphaned(self) -> set[int]:
        """PIDs of processes whose parent is outside the tree (re-parented to PID 1 or a subreaper)."""
        pids = {p.pid for p in self.procs}
        return {p.pid for p in self.procs if p.pid != self.main.pid and p.ppid not in pids}


@dataclass(frozen=True)
class Snapshot:
    host: str
    boot_time: float
    taken_at: float
    workers: tuple[Worker, ...]
    source: str = "scan"  # how the workers were found: control, supervisor, scan
    warnings: tuple[str, ...] = ()
    boot_id: str | None = None  # the kernel's id of this boot; None in records that predate it


def hostname() -> str:
    return socket.gethostname()


def assign_roles(main: Proc, descendants: Iterable[Proc], pool_pids: Iterable[int] = ()) -> tuple[Proc, ...]:
    """Mark the main, its pool processes and the task descendants.

    A pool process is a direct child of the main that the worker itself
    named (``stats()['pool']['processes']``) or, without that reply, one
    that runs the main's own command line: prefork pool processes are forks
    of the main, while anything a task started runs some other program.
    """
    pool = set(pool_pids)
    out = [main.with_role(MAIN)]
    for p in descendants:
        is_pool = p.ppid == main.pid and (p.pid in pool or p.cmdline == main.cmdline)
        role = POOL if is_pool else TASK
        out.append(p if p.role == role else p.with_role(role))
    return tuple(out)


def read_worker(
    main_pid: int,
    *,
    pool_pids: Iterable[int] = (),
    node: str | None = None,
    app: str | None = None,
    program: str | None = None,
    supervisor_pid: int | None = None,
    tasks: Iterable[Task] = (),
) -> Worker | None:
    """Read one worker's live tree, or ``None`` if its main process is gone."""
    found = procs.read_proc_threads(main_pid, role=MAIN)
    if found is None:
        return None
    main, threads = found
    tree = assign_roles(main, procs.walk(main, threads=threads), pool_pids)
    return Worker(
        main=tree[0],
        procs=tree,
        node=node,
        app=app,
        program=program,
        supervisor_pid=supervisor_pid,
        tasks=tuple(tasks),
    )


def take(workers: Iterable[Worker], source: str, warnings: Iterable[str] = ()) -> Snapshot:
    return Snapshot(
        host=hostname(),
        boot_time=procs.boot_time(),
        taken_at=time.time(),
        workers=tuple(workers),
        source=source,
        warnings=tuple(warnings),
        boot_id=procs.boot_id(),
    )


__all__ = ["MAIN", "POOL", "TASK", "Proc", "Task", "Worker", "Snapshot", "read_worker", "take", "assign_roles"]
