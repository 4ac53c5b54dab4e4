"""The kill's second look at a recorded worker, and the processes never to signal.

A state file describes the trees as savepid saw them. Before the plan runs
again, :func:`revisit` re-verifies each recorded process by PID and creation
time, adds what the survivors have forked since, and the orphans still in
the worker's process group (:func:`with_group_orphans` does the same for a
live snapshot, so status and savepid show them), and the members of the
worker's cgroup that left both (:func:`with_cgroup_members`, see
:mod:`celery_supervise.processes.cgroups`). :func:`protected_pids` is
what the plan must refuse whatever the tree says.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Iterable

from . import cgroups, procs
from .kill import GONE, REFUSED, Outcome
from .plan import orphans
from .procs import POOL, TASK, Proc
from .snapshot import Worker


def protected_pids(extra: Iterable[int] = ()) -> dict[int, str]:
    """PIDs never to signal, with the reason: PID 1, us, our ancestors, supervisord.

    Any process whose command is supervisord counts, not only the recorded
    one: killing a supervisord would take every program it runs with it.
    """
    me = os.getpid()
    out = {1: "PID 1", me: "this tool itself"}
    for pid in procs.ancestors(me):
        out.setdefault(pid, "an ancestor of this tool")
    for pid in extra:
        out.setdefault(pid, "supervisord")
    for pid, _ppid, cmdline in procs.iter_cmdlines(b"supervisor"):
        if procs.runs_supervisord(cmdline):
            out.setdefault(pid, "supervisord")
    return out



def orphans_in_group(main: Proc, known: set[int]) -> list[Proc]:
    """Processes born into the recorded worker's process group that we have not seen.

    The rules are :func:`celery_supervise.processes.plan.orphans`; this reads the
    candidates. Only a group leader's group is scanned at all.
    """
    if main.pgid != main.pid:
        return []
    candidates = (procs.read_proc(pid) for pid in procs.pids_in_group(main.pgid) if pid not in known)
    return orphans(main, procs.live_identity(main.pid), (p for p in candidates if p is not None), known)


def adopt_group_orphans(main: Proc, live: dict[int, Proc]) -> None:
    """Add the orphans in *main*'s process group, and their descendants, to *live* (by PID)."""
    for orphan in orphans_in_group(main, set(live)):
        if orphan.pid in live:
            continue
        live[orphan.pid] = orphan
        for kid in procs.walk(orphan, skip=live):
            live[kid.pid] = kid


def with_group_orphans(worker: Worker) -> Worker:
    """*worker* as just read, plus what it already orphaned (savepid, status).

    A task's child whose parent exited (an intermediate shell, a daemon
    that double-forked without ``setsid``) is re-parented to PID 1 or a
    subreaper while the worker runs, so it is no longer below the worker,
    but it is still in the worker's process group and still the worker's
    to clean up. The kill finds it the same way (:func:`revisit`); finding
    it here too lets status show it and savepid record it, with its verdict.
    """
    live = worker.by_pid()
    adopt_group_orphans(worker.main, live)
    if len(live) == len(worker.procs):
        return worker
    known = worker.by_pid()
    # Creation order puts each parent ahead of its children, as the plan expects.
    found = sorted((p for pid, p in live.items() if pid not in known), key=lambda p: p.create_time)
    return replace(worker, procs=worker.procs + tuple(found))


def adopt_cgroup_members(worker: Worker, live: dict[int, Proc], mode: str = cgroups.AUTO) -> str | None:
    """Add the members of *worker*'s recorded cgroup, and their descendants, to *live*.

    These are the children that left both the tree and the process group.
    Returns why the cgroup was not used, when it was recorded but cannot be
    trusted now.
    """
    if worker.cgroup is None or mode == cgroups.OFF:
        return None
    found, why = cgroups.read_members(worker.cgroup, worker.main, live)
    for member in found:
        if member.pid in live:
            continue
        live[member.pid] = member
        for kid in procs.walk(member, skip=live):
            live[kid.pid] = kid
    return why


def with_cgroup_members(worker: Worker, mode: str = cgroups.AUTO) -> Worker:
    """*worker* with its cgroup (or why it has none) and the members that escaped (savepid, status, listener)."""
    cgroup, reason = cgroups.of_worker(worker.main.pid, mode)
    worker = replace(worker, cgroup=cgroup, cgroup_reason=reason)
    live = worker.by_pid()
    why = adopt_cgroup_members(worker, live, mode)
    if why:
        worker = replace(worker, cgroup=None, cgroup_reason=why)
    if len(live) == len(worker.procs):
        return worker
    known = worker.by_pid()
    found = sorted((p for pid, p in live.items() if pid not in known), key=lambda p: p.create_time)
    return replace(worker, procs=worker.procs + tuple(found))


def revisit(worker: Worker, cgroup_mode: str = cgroups.AUTO,
            warnings: list[str] | None = None) -> tuple[Worker, list[Outcome]]:
    """Today's view of a recorded worker, plus what is already settled.

    Recorded processes are re-verified by PID and creation time; those that
    died are GONE, those whose PID now names another process are REFUSED
    and never looked at again. New descendants of the survivors, and
    orphans in the worker's process group, join the tree, and so do the
    members of its recorded cgroup (unless *cgroup_mode* is off); why that
    cgroup cannot be trusted any more goes to *warnings*.
    """
    settled: list[Outcome] = []
    live: dict[int, Proc] = {}
    threads: dict[int, int] = {}
    for rec in worker.procs:
        found = procs.read_proc_threads(rec.pid)
        cur = None if found is None else found[0]
        if cur is None:
            settled.append(Outcome(rec, worker.main.pid, GONE, "already gone"))
        elif not rec.same_process(cur):
            settled.append(
                Outcome(rec, worker.main.pid, REFUSED, "PID now held by another process (creation time differs)")
            )
        else:
            live[rec.pid] = cur.with_role(rec.role)
            threads[rec.pid] = found[1]
    # Decided before the walks: a process found below a survivor under the
    # recorded main's PID is a newcomer that recycled it, not the main (the
    # main itself failed the check above), and must not be planned as one.
    main_alive = worker.main.pid in live
    # Each survivor's children are read once: a walk skips the processes
    # already held (they get walks of their own), so a 1,000-process tree
    # costs 1,000 reads, not one per process per ancestor.
    for p in list(live.values()):
        for kid in procs.walk(p, threads=threads[p.pid], skip=live):
            live[kid.pid] = kid
    adopt_group_orphans(worker.main, live)
    why = adopt_cgroup_members(worker, live, cgroup_mode)
    if why and warnings is not None:
        warnings.append(f"worker {worker.main.pid}: {why}")
    main = live[worker.main.pid] if main_alive else worker.main
    rest = []
    for p in live.values():
        if main_alive and p.pid == main.pid:
            continue
        # A pool process forked since the snapshot (maxtasksperchild, a pool
        # restart) runs the main's own command line, like any pool process.
        if main_alive and p.role == TASK and p.ppid == main.pid and p.cmdline == main.cmdline:
            p = p.with_role(POOL)
        rest.append(p)
    # Parents are always created before their children, so creation order
    # puts every parent ahead of its children, as the plan expects.
    tree = sorted(rest, key=lambda p: p.create_time)
    if main_alive:
        tree.insert(0, main)
    return replace(worker, main=main, procs=tuple(tree), cgroup=None if why else worker.cgroup), settled
