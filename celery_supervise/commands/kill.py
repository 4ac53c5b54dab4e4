"""``celery-supervise kill``: kill what a state file recorded, by the plan's verdicts.

Read the record under the reaper lock, re-visit each recorded tree
(:func:`celery_supervise.processes.revisit.revisit`, cgroup members
included), plan it again with the protected PIDs, act
(:func:`celery_supervise.processes.kill.execute`), then release each
worker's cgroup (:func:`release_cgroups`).
The old script's bare PID list is still read: only live Celery workers of
our project are acted on.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable

import psutil

from .. import options
from ..celery_side import discovery
from ..errors import UsageError
from ..processes import audit as auditing, cgroups, procs, statefile
from ..processes.kill import GONE, REFUSED, SPARED, KillReport, Outcome, execute
from ..processes.lock import reaper_lock
from ..processes.plan import Policy, plan
from ..processes.procs import MAIN, POOL, Proc
from ..processes.revisit import protected_pids, revisit
from ..processes.snapshot import Worker

DEFAULT_GRACE = options.GRACE  # seconds between SIGTERM and SIGKILL


def legacy_workers(pids: Iterable[int], app_spec: str | None) -> tuple[list[Worker], list[Outcome]]:
    """Trees rooted at the old script's PIDs, when they are live Celery workers.

    The old file has no creation times, so the only guard against a
    recycled PID is that the process is a Celery worker, and, when we know
    our app (``-A``), one of our project: as savepid's scan tells them
    apart, the same app name and, where the worker's folder holds the
    app's package, the folder ours is imported from. Its live descendants
    get the usual verdicts.
    """
    root = discovery.app_root(app_spec) if app_spec else None
    workers, settled = [], []
    for pid in dict.fromkeys(pids):
        p = procs.read_proc(pid)
        if p is None:
            settled.append(Outcome(_unknown(pid), pid, GONE, "already gone"))
            continue
        command = discovery.parse_worker_cmdline(p.cmdline, _environ(pid, p.cmdline))
        if command is None:
            settled.append(Outcome(p, pid, REFUSED, "not a Celery worker (PID recycled?)"))
            continue
        if app_spec:
            refusal = _other_project(pid, command, app_spec, root)
            if refusal:
                settled.append(Outcome(p, pid, REFUSED, refusal))
                continue
        parent = procs.read_proc(p.ppid)
        role = POOL if parent is not None and parent.cmdline == p.cmdline else MAIN
        root_proc = p.with_role(role)
        workers.append(Worker(main=root_proc, procs=(root_proc, *procs.walk(root_proc))))
    return workers, settled


def _environ(pid: int, cmdline: tuple[str, ...]) -> dict | None:
    """The environment of a worker whose command line names no app (it may come from CELERY_APP)."""
    if any(a in ("-A", "--app") or a.startswith(("--app=", "-A")) for a in cmdline):
        return None
    try:
        return psutil.Process(pid).environ()
    except psutil.Error:
        return None


def _other_project(pid: int, command, app_spec: str, root: str | None) -> str | None:
    """Why the worker *pid* is not one of *app_spec*'s project, or ``None`` if it is."""
    if not discovery.app_names_match(command.app, app_spec):
        return f"a worker of another app ({command.app})"
    if root is None:
        return (f"cannot tell whose project it is: -A {app_spec} cannot be found from here "
                "(run kill from your project's folder, as for `celery -A`)")
    try:
        proc = psutil.Process(pid)
        if discovery.same_project(proc, command, app_spec, root):
            return None
        folder = proc.cwd()
    except psutil.NoSuchProcess:
        return "exited while being looked at"
    return f"a worker of another project ({command.app} in {folder}, ours is in {root})"


def _unknown(pid: int) -> Proc:
    return Proc(pid=pid, ppid=0, create_time=0.0, pgid=0, sid=0, uid=-1, cmdline=(), sighup_ignored=False)


def kill(
    path: str,
    *,
    policy: Policy | None = None,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    app_spec: str | None = None,
    on_wait: Callable[[int, float, float], None] | None = None,
    audit: auditing.AuditLog | None = None,
    cgroup_mode: str = cgroups.AUTO,
) -> KillReport:
    """Kill what *path* recorded (and its late-born orphans and escaped cgroup members) by the verdicts.

    Every signal goes to *audit* (by default the audit log of a ``kill``
    command, see :mod:`celery_supervise.processes.audit`), with *path* as
    its record.
    """
    if grace < 0:
        raise UsageError("--grace must not be negative")
    if audit is None:
        audit = auditing.AuditLog("kill")
    audit.record = audit.record or os.path.abspath(path)
    # A dry run changes nothing, so it need not wait for a running reaper.
    with contextlib.nullcontext() if dry_run else reaper_lock():
        return _kill_locked(path, policy=policy, grace=grace, dry_run=dry_run, app_spec=app_spec, on_wait=on_wait,
                            audit=audit, cgroup_mode=cgroup_mode)


def release_cgroups(workers: Iterable[Worker], report: KillReport, mode: str = cgroups.AUTO) -> list[str]:
    """After a kill: move each worker's spared members to ``detached``, remove its cgroup."""
    if mode == cgroups.OFF:
        return []
    spared = {o.proc.pid: o.proc for o in report.by_status(SPARED)}
    warnings = []
    for w in workers:
        if w.cgroup is None:
            continue
        keep = [pid for pid, p in spared.items() if p.same_process(procs.live_identity(pid) or -1.0)]
        # A child a spared process forked after the plan is spared with it.
        pids, _ = cgroups.members(w.cgroup)
        for pid in pids or ():
            if pid not in keep and any(a in keep for a in procs.ancestors(pid)):
                keep.append(pid)
        warnings += cgroups.release(w.cgroup, keep)
    return warnings


def _kill_locked(path, *, policy, grace, dry_run, app_spec, on_wait, audit,
                 cgroup_mode=cgroups.AUTO) -> KillReport:
    # Read under the lock: a reaper that waited sees the world as the
    # previous one left it, and its re-verification reports those as gone.
    record = statefile.read_here(path)
    warnings: list[str] = []
    if isinstance(record, statefile.LegacyRecord):
        warnings.append(
            f"{path} is a bare PID list (the old savepid format): no creation times, so only PIDs "
            "that are live Celery workers are acted on"
        )
        workers, settled = legacy_workers(record.pids, app_spec)
        policy = policy or Policy()
        sup = []
    else:
        policy = policy or record.policy
        workers, settled = [], []
        for w in record.snapshot.workers:
            live, done = revisit(w, cgroup_mode, warnings)
            workers.append(live)
            settled += done
        sup = [w.supervisor_pid for w in record.snapshot.workers if w.supervisor_pid]
    verdicts = plan(workers, policy, protected_pids(sup))
    report = execute(verdicts, grace=grace, dry_run=dry_run, on_wait=on_wait, audit=audit)
    if not dry_run:
        warnings += release_cgroups(workers, report, cgroup_mode)
    report.outcomes[:0] = settled
    report.warnings[:0] = warnings
    return report
