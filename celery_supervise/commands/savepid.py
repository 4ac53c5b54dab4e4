"""``celery-supervise savepid`` and ``status``: the live worker trees, recorded or shown.

Both discover this host's workers (:mod:`celery_supervise.celery_side.discovery`),
read their trees, and plan them; savepid writes the record the kill reads
later, status only shows it. The listener records a worker through
:func:`record` too, with its supervisord's identity as data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import options
from ..celery_side import discovery, task_json
from ..celery_side.discovery import Discovery
from ..errors import EXIT_OK, EXIT_PARTIAL, StateFileError, UsageError
from ..processes import cgroups, statefile
from ..processes.plan import Policy, Verdict, plan
from ..processes.procs import Identity
from ..processes.revisit import protected_pids, with_cgroup_members, with_group_orphans
from ..processes.snapshot import Snapshot, read_worker, take

DEFAULT_TIMEOUT = options.REPLY_TIMEOUT  # seconds to wait for each broker reply


@dataclass
class SaveResult:
    path: str
    snapshot: Snapshot
    policy: Policy
    verdicts: list[Verdict]
    warnings: list[str] = field(default_factory=list)
    # The broker failed: the trees are recorded, the active tasks are not (exit 3).
    broker_error: str | None = None

    @property
    def exit_code(self) -> int:
        """3 when the broker failed: the record lacks the tasks a stop would cut off (requeue could not re-send them)."""
        return EXIT_PARTIAL if self.broker_error else EXIT_OK

    @property
    def problem(self) -> str | None:
        if not self.broker_error:
            return None
        return (f"the broker failed ({self.broker_error}): {self.path} records the process trees but not the "
                "active tasks, so requeue could not re-send what a stop cuts off; run savepid again once the "
                "broker is back (kill works with this record)")

    def to_document(self) -> dict:
        doc = statefile.to_document(self.snapshot, self.policy, self.verdicts)
        doc["path"] = self.path
        doc["broker_error"] = self.broker_error
        doc["exit_code"] = self.exit_code
        return doc

    def summary(self) -> dict:
        """What savepid recorded, in numbers (the record itself is the state file)."""
        workers = self.snapshot.workers
        return {"path": self.path, "source": self.snapshot.source, "workers": len(workers),
                "processes": sum(len(w.procs) for w in workers),
                "already_orphaned": sum(len(w.already_orphaned()) for w in workers),
                "tasks": sum(len(w.tasks) for w in workers), "policy": str(self.policy)}


@dataclass
class StatusResult:
    snapshot: Snapshot
    policy: Policy
    verdicts: list[Verdict]
    warnings: list[str] = field(default_factory=list)

    exit_code = EXIT_OK  # status changes nothing, and shows whatever it finds

    def containment(self) -> list[str]:
        """Per worker, what finds its escaped children: ``cgroup <path>`` or ``process group only: <why>``."""
        return [cgroups.describe(w.cgroup, w.cgroup_reason) for w in self.snapshot.workers]

    def to_document(self) -> dict:
        doc = statefile.to_document(self.snapshot, self.policy, self.verdicts)
        for entry, line in zip(doc["workers"], self.containment()):
            entry["containment"] = line
        return doc


@dataclass(frozen=True)
class Targets:
    """Which workers are ours, and how to ask about them (savepid, status)."""

    app: object = None  # the loaded Celery app, for the broker
    app_spec: str | None = None  # as given to -A, for matching command lines
    supervisor_url: str | None = None
    programs: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT  # per broker reply
    supervisor_auth: tuple[str | None, str | None] = (None, None)  # username, password
    cgroups: str = cgroups.AUTO  # --cgroups: auto (use each worker's cgroup where it has one) or off


def live_snapshot(targets: Targets) -> tuple[Snapshot, list[str], str | None]:
    """Discover this host's workers and read their trees; the broker's failure, if any."""
    found: Discovery = discovery.discover(
        app=targets.app, app_spec=targets.app_spec, supervisor_url=targets.supervisor_url,
        programs=list(targets.programs), timeout=targets.timeout, supervisor_auth=targets.supervisor_auth,
    )
    workers = []
    for f in found.workers:
        w = read_worker(
            f.pid,
            pool_pids=f.pool_pids,
            node=f.command.node,
            app=f.command.app,
            program=f.program,
            supervisor_pid=f.supervisor_pid,
            tasks=f.tasks,
        )
        if w is not None:  # it exited while we asked the broker
            workers.append(with_cgroup_members(with_group_orphans(w), targets.cgroups))
    warnings = list(found.warnings)
    if found.broker_error:
        warnings.append(f"{found.broker_error}; recorded the local process trees, but active tasks are missing")
    return take(workers, found.source, warnings), warnings, found.broker_error if workers else None


def savepid(path: str, targets: Targets, policy: Policy = Policy()) -> SaveResult:
    """Record this host's worker trees, verdicts and active tasks in *path*."""
    if targets.app_spec is None and not targets.supervisor_url:
        raise UsageError("savepid needs -A APP or --supervisor-url to know which workers are yours")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise StateFileError(path, "its folder does not exist")
    snapshot, warnings, broker_error = live_snapshot(targets)
    # Written even when the broker failed: the trees are what the kill needs.
    verdicts = record(path, snapshot, policy)
    if not snapshot.workers:
        warnings = warnings + ["no Celery worker is running on this host; wrote an empty record"]
    return SaveResult(path, snapshot, policy, verdicts, warnings, broker_error)


def record(path: str, snapshot: Snapshot, policy: Policy, supervisor: Identity | None = None) -> list[Verdict]:
    """Write *snapshot*, planned by *policy*, to *path*; its verdicts.

    savepid's record, and the listener's: that one also names the
    supervisord that ran the worker (*supervisor*), so a later sweep can
    tell a worker whose supervisord died.
    """
    verdicts = plan(snapshot.workers, policy)
    statefile.write(path, statefile.to_document(snapshot, policy, verdicts, supervisor), task_json.Encoder)
    return verdicts


def status(targets: Targets, policy: Policy = Policy()) -> StatusResult:
    """The live trees with their verdicts; changes nothing."""
    snapshot, warnings, _ = live_snapshot(targets)
    protected = protected_pids(w.supervisor_pid for w in snapshot.workers if w.supervisor_pid)
    return StatusResult(snapshot, policy, plan(snapshot.workers, policy, protected), warnings)
