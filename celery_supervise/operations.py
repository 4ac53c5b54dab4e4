"""The one core behind every shell: savepid, kill, status and drain.

The typer CLI, the Django management command and the eventlistener parse
their own input, call these functions, and render the results. Nothing in
here prints or exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable

import psutil

from . import cgroups, control, discovery, drain as draining, procs, restart as restarting, statefile
from .discovery import Discovery
from .errors import PartialError, StateFileError, SuperviseError, SupervisorError, UsageError
from .lock import reaper_lock
from .kill import FAILED, GONE, KILLED, REFUSED, SPARED, KillReport, Outcome, execute
from .plan import Policy, Verdict, orphans, plan
from .procs import MAIN, POOL, TASK, Proc
from .snapshot import Snapshot, Worker, read_worker, take

if TYPE_CHECKING:
    # Imported where requeue runs: they bring kombu's JSON and transports,
    # which savepid, status and kill never need.
    from . import requeue as requeuing


# Defaults shared by every shell (CLI, Django command, listener).
DEFAULT_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
DEFAULT_TIMEOUT = 2.0  # seconds to wait for each broker reply
DEFAULT_DRAIN_TIMEOUT = draining.DEFAULT_TIMEOUT  # seconds a drain may take in all


@dataclass
class SaveResult:
    path: str
    snapshot: Snapshot
    policy: Policy
    verdicts: list[Verdict]
    warnings: list[str] = field(default_factory=list)
    # The broker failed: the trees are recorded, the active tasks are not (exit 3).
    broker_error: str | None = None


@dataclass
class StatusResult:
    snapshot: Snapshot
    policy: Policy
    verdicts: list[Verdict]
    warnings: list[str] = field(default_factory=list)


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


# ------------------------------------------------------------------ snapshot


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
    verdicts = plan(snapshot.workers, policy)
    # Written even when the broker failed: the trees are what the kill needs.
    statefile.write(path, statefile.to_document(snapshot, policy, verdicts))
    if not snapshot.workers:
        warnings = warnings + ["no Celery worker is running on this host; wrote an empty record"]
    return SaveResult(path, snapshot, policy, verdicts, warnings, broker_error)


def status(targets: Targets, policy: Policy = Policy()) -> StatusResult:
    """The live trees with their verdicts; changes nothing."""
    snapshot, warnings, _ = live_snapshot(targets)
    protected = protected_pids(w.supervisor_pid for w in snapshot.workers if w.supervisor_pid)
    return StatusResult(snapshot, policy, plan(snapshot.workers, policy, protected), warnings)


# ---------------------------------------------------------------------- kill


def _orphans_in_group(main: Proc, known: set[int]) -> list[Proc]:
    """Processes born into the recorded worker's process group that we have not seen.

    The rules are :func:`celery_supervise.plan.orphans`; this reads the
    candidates. Only a group leader's group is scanned at all.
    """
    if main.pgid != main.pid:
        return []
    candidates = (procs.read_proc(pid) for pid in procs.pids_in_group(main.pgid) if pid not in known)
    return orphans(main, procs.live_identity(main.pid), (p for p in candidates if p is not None), known)


def adopt_group_orphans(main: Proc, live: dict[int, Proc]) -> None:
    """Add the orphans in *main*'s process group, and their descendants, to *live* (by PID)."""
    for orphan in _orphans_in_group(main, set(live)):
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

    These are the children that left both the tree and the process group
    (see :mod:`celery_supervise.cgroups`). Returns why the cgroup was not
    used, when it was recorded but cannot be trusted now.
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
    """*worker* with its cgroup (or why it has none) and the members that escaped (savepid, status)."""
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


def revisit(worker: Worker, cgroup_mode: str = cgroups.AUTO,
            warnings: list[str] | None = None) -> tuple[Worker, list[Outcome]]:
    """Today's view of a recorded worker, plus what is already settled.

    Recorded processes are re-verified by PID and creation time; those that
    died are GONE, those whose PID now names another process are REFUSED
    and never looked at again. New descendants of the survivors, and
    orphans in the worker's process group, join the tree.
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
    return replace(worker, main=main, procs=tuple(tree),
                   cgroup=None if why else worker.cgroup), settled


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
    cgroup_mode: str = cgroups.AUTO,
) -> KillReport:
    """Kill what *path* recorded (and its late-born orphans and escaped cgroup members) by the verdicts."""
    if grace < 0:
        raise UsageError("--grace must not be negative")
    # A dry run changes nothing, so it need not wait for a running reaper.
    with contextlib.nullcontext() if dry_run else reaper_lock():
        return _kill_locked(path, policy=policy, grace=grace, dry_run=dry_run, app_spec=app_spec, on_wait=on_wait,
                            cgroup_mode=cgroup_mode)


def _kill_locked(path, *, policy, grace, dry_run, app_spec, on_wait, cgroup_mode=cgroups.AUTO) -> KillReport:
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
    report = execute(verdicts, grace=grace, dry_run=dry_run, on_wait=on_wait)
    if not dry_run:
        warnings += release_cgroups(workers, report, cgroup_mode)
    report.outcomes[:0] = settled
    report.warnings[:0] = warnings
    return report


# --------------------------------------------------------------------- drain


def drain(
    app,
    app_spec: str | None,
    *,
    destinations: Iterable[str] = (),
    all_workers: bool = False,
    timeout: float = DEFAULT_DRAIN_TIMEOUT,
    on_progress: Callable[[draining.Assessment, float, float], None] | None = None,
    remote_factory: Callable[[object], draining.Remote] = control.Remote,
) -> draining.DrainResult:
    """Stop workers taking tasks and wait until they hold none.

    Targets are this host's workers of *app_spec* (found by a process scan,
    as savepid finds them, with no round trip), the nodes named in
    *destinations*, or with *all_workers* every worker that answers on the
    app's broker.
    """
    from celery.utils.nodenames import host_format

    if app is None or not app_spec:
        raise UsageError("drain needs -A APP: the app whose broker and queues the workers use")
    destinations = [host_format(d) for d in destinations]
    if destinations and all_workers:
        raise UsageError("--destination and --all exclude each other")
    if not timeout > 0:
        raise UsageError("--drain-timeout must be positive")
    configured = draining.configured_queues(app.conf.task_default_queue, app.conf.task_queues)
    targets: list[draining.Target] | None = None  # None: every worker that answers
    if not all_workers:
        local = draining.local_targets(discovery.scan(app_spec, discovery.app_root(app_spec)), configured)
        targets = draining.named_targets(destinations, local) if destinations else local
        if not targets:
            return draining.DrainResult(
                targets=(), cancelled=(), drained=True, elapsed=0.0, timeout=timeout,
                warnings=[f"no Celery worker of {app_spec} is running on this host; nothing to drain "
                          "(name workers elsewhere with --destination, or use --all)"],
            )
    with remote_factory(app) as remote:
        return draining.Drainer(remote, on_progress=on_progress).run(targets, configured, timeout)


# ------------------------------------------------------------------- requeue

RESENT = "re-sent"
WOULD_RESEND = "would re-send"
SKIPPED = "skipped"
FAILED = "failed"

#: Files of the journal last written this long before the earliest recorded
#: task started are not read (a margin for the clocks of two processes).
JOURNAL_SLACK = 60.0


@dataclass
class RequeueOutcome:
    decision: requeuing.Decision
    status: str  # RESENT, WOULD_RESEND, SKIPPED or FAILED
    error: str | None = None

    @property
    def reason(self) -> str:
        return self.decision.reason if self.error is None else f"{self.decision.reason}; {self.error}"


@dataclass
class RequeueResult:
    path: str
    ledger: str
    journal: str | None  # the journal directory read, if any
    dry_run: bool
    outcomes: list[RequeueOutcome]
    warnings: list[str] = field(default_factory=list)

    def by_status(self, status: str) -> list[RequeueOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def partial(self) -> bool:
        return bool(self.by_status(FAILED))


class _AsRecorded:
    """A Celery router that leaves the route alone: the recorded one is the route."""

    def route(self, options, name, args=(), kwargs=None, task_type=None):
        return options


def send_again(app, conn, decision: requeuing.Decision) -> None:
    """Publish the recorded task again: same id, name, arguments and route, no retries."""
    from . import requeue as requeuing

    task, route = decision.task, decision.route
    args, kwargs = requeuing.arguments(task)
    # Through Celery's own send_task, so that the app's serializer, signals
    # (before_task_publish…) and result backend see an ordinary send. An
    # explicit queue is declared first, as Celery does, so a queue that is
    # gone is created again rather than the message dropped.
    app.send_task(
        task.name, args=args, kwargs=kwargs, task_id=task.id, connection=conn, router=_AsRecorded(),
        queue=route.queue, exchange=route.exchange, routing_key=route.routing_key, priority=route.priority,
        retry=False, add_to_parent=False,
    )


def broker_redelivery(app) -> tuple[bool, frozenset[str] | None]:
    """Whether the app's broker keeps unacknowledged messages, and if not, the ids queued now.

    RabbitMQ, Redis, SQS keep them on the broker. kombu's filesystem and
    memory transports keep them in the consumer's memory: they are back in
    the queue only if the worker shut down cleanly, which the filesystem
    transport's folder shows.
    """
    conn = app.connection_for_write()  # not connected yet: only its transport is looked at
    try:
        driver = conn.transport.driver_type
        if driver not in ("filesystem", "memory"):
            return True, None
        folder = (conn.transport_options or {}).get("data_folder_in")
        if driver == "filesystem" and folder:
            from . import fs_transport

            return False, frozenset(fs_transport.queued_task_ids(folder))
        return False, None
    finally:
        conn.release()


def requeue(
    path: str,
    app,
    *,
    journal_dir: str | None = None,
    dry_run: bool = False,
    publish: Callable[[object, object, requeuing.Decision], None] = send_again,
    connect: Callable[[object], object] = control.connect,
) -> RequeueResult:
    """Send again the tasks *path* recorded that were cut off and will not come back by themselves.

    See :mod:`celery_supervise.requeue` for the rules. The journal is
    *journal_dir*, else the one the app's configuration names (see
    :mod:`celery_supervise.journal`). Sent task ids go to the ledger beside
    *path* one by one, so running it again sends nothing twice. The broker
    is reached before anything is sent: when it is down, nothing is sent
    and the ledger is untouched.
    """
    from . import ledger as ledgers

    if app is None:
        raise UsageError("requeue needs -A APP: the app whose broker the tasks are sent through")
    with ledgers.exclusive(path):
        record = statefile.read_here(path)
        if isinstance(record, statefile.LegacyRecord):
            raise StateFileError(path, "is a bare PID list (the old savepid format): it records no tasks to requeue")
        return _requeue_locked(path, app, record, journal_dir=journal_dir, dry_run=dry_run,
                               publish=publish, connect=connect)


def _requeue_locked(path, app, record, *, journal_dir, dry_run, publish, connect) -> RequeueResult:
    from . import journal as journaling, ledger as ledgers, requeue as requeuing

    snap = record.snapshot
    recorded = [requeuing.Recorded(t, w.node, w.main.pid) for w in snap.workers for t in w.tasks]
    warnings: list[str] = []
    if snap.workers and "control" not in snap.source.split("+"):
        warnings.append(f"{path} was recorded without the broker's answer (workers found by {snap.source}): "
                        "it holds no running task, so there is nothing to requeue")
    ledger = ledgers.read(path, host=snap.host, taken_at=snap.taken_at)
    directory = journal_dir or journaling.configured_directory(app)
    entries = None
    if directory:
        starts = [t.task.time_start for t in recorded]
        since = None
        if starts and all(isinstance(s, (int, float)) for s in starts):
            since = min(starts) - JOURNAL_SLACK
        entries = journaling.read(directory, (r.task.id for r in recorded), since)
    keeps_unacked, queued = broker_redelivery(app)
    decisions = requeuing.decide(recorded, journal=entries, ledger=ledger.ids,
                                 broker_keeps_unacked=keeps_unacked, queued=queued)
    warnings += _at_least_once_warnings(decisions, directory)

    to_send = [d for d in decisions if d.action == requeuing.RESEND]
    outcomes = {id(d): RequeueOutcome(d, SKIPPED) for d in decisions if d.action != requeuing.RESEND}
    if dry_run:
        for d in to_send:
            outcomes[id(d)] = RequeueOutcome(d, WOULD_RESEND)
    elif to_send:
        conn = connect(app)  # BrokerError when it is down: nothing sent, ledger untouched
        try:
            # Write the ledger once before the first send: a folder that
            # cannot take it (read-only, full) fails here with nothing sent,
            # not after a send it could not record (a rerun would send that
            # one twice).
            ledgers.save(ledger, path)
            failure = None
            for d in to_send:
                if failure is not None:
                    outcomes[id(d)] = RequeueOutcome(d, FAILED, "not sent: the broker failed before")
                    continue
                try:
                    publish(app, conn, d)
                except Exception as exc:  # kombu and the transports raise many kinds
                    failure = " ".join(f"{type(exc).__name__}: {exc}".split())
                    outcomes[id(d)] = RequeueOutcome(d, FAILED, f"not sent: {failure}")
                    continue
                try:
                    ledgers.record_sent(ledger, path, d.task.id, name=d.task.name, route=d.route.describe())
                except StateFileError as exc:
                    raise PartialError(f"task {d.task.id} was re-sent, but the ledger could not record it "
                                       f"({exc}): running requeue again would send it twice") from None
                outcomes[id(d)] = RequeueOutcome(d, RESENT)
            if failure is not None:
                warnings.append(f"the broker failed while re-sending ({failure}); the tasks re-sent before "
                                f"are in {ledger.path}: run requeue again to send the rest")
        finally:
            with contextlib.suppress(Exception):
                conn.release()
    return RequeueResult(path, ledger.path, directory, dry_run, [outcomes[id(d)] for d in decisions], warnings)


def _at_least_once_warnings(decisions, directory) -> list[str]:
    from . import requeue as requeuing

    weak = requeuing.at_least_once(decisions)
    if not weak:
        return []
    if directory is None:
        return [f"no task journal: {len(weak)} task(s) are re-sent at least once: a task that finished between "
                "savepid and the stop runs again (install celery_supervise.journal in the app, or pass --journal DIR)"]
    return [f"{len(weak)} task(s) are not in the journal {directory} (was it installed in the worker?): "
            "they are re-sent at least once: one that finished between savepid and the stop runs again"]


__all__ = ["Targets", "savepid", "kill", "status", "drain", "requeue", "SaveResult", "StatusResult",
           "RequeueResult", "protected_pids"]
# ------------------------------------------------------------------- restart


def restart(
    app,
    app_spec: str | None,
    programs: Iterable[str],
    server,
    *,
    state_path: str | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    start_timeout: float = restarting.DEFAULT_START_TIMEOUT,
    timeout: float = DEFAULT_TIMEOUT,
    on_drain: Callable | None = None,
    on_wait: Callable | None = None,
    remote_factory: Callable[[object], control.Remote] = control.Remote,
    clock: Callable[[], float] = time.monotonic,
) -> restarting.RestartResult:
    """Restart supervisord *programs* (an ``rpc.Server``'s) without losing a task or a leftover.

    savepid -> drain -> stop -> kill -> start -> ready. Errors before the
    stop raise and change nothing (beyond a drain's cancels, which the
    message names). A drain that times out returns with ``problem`` set and
    the workers still running: they are never stopped with a task in hand.
    A kill that leaves a process alive does not keep the new workers from
    starting; it sets ``problem``.
    """
    from . import rpc

    if app is None or not app_spec:
        raise UsageError("restart needs -A APP: the app whose workers it drains and pings")
    if grace < 0 or not drain_timeout > 0 or not start_timeout > 0:
        raise UsageError("--grace must not be negative; --drain-timeout and --start-timeout must be positive")
    if state_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(state_path))):
        raise StateFileError(state_path, "its folder does not exist")
    names = rpc.expand_names(list(programs), rpc.all_process_info(server))  # unreachable: nothing done
    result = restarting.RestartResult(processes=names)
    scratch = None
    if state_path is None:
        scratch = tempfile.mkdtemp(prefix="celery-supervise-restart-")
        state_path = os.path.join(scratch, "state.json")
    else:
        result.state_file = state_path
    try:
        _restart(result, app, app_spec, server, state_path, drain_timeout, grace, start_timeout, timeout,
                 on_drain, on_wait, remote_factory, clock)
        if result.kill is not None and result.kill.partial:
            result.state_file = state_path  # for a later `celery-supervise kill` of what survived
    except BaseException as exc:
        if result.stopped and not (result.kill and not result.kill.partial):
            result.state_file = state_path  # the only record of what the stop left behind
            scratch = None
        if result.stopped and isinstance(exc, SuperviseError):
            # Exit 1 would say "nothing changed"; the workers were stopped.
            kept = f"; the record of the old workers is kept in {state_path}" if scratch is None else ""
            raise PartialError(f"{exc} (after the stop of {', '.join(names)}: "
                               f"{'started again' if result.started else 'not started again'}{kept})") from None
        raise
    finally:
        if scratch is not None and result.state_file != state_path:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def _restart(result, app, app_spec, server, path, drain_timeout, grace, start_timeout, timeout,
             on_drain, on_wait, remote_factory, clock) -> None:
    from . import rpc

    def phase(name, started, detail=""):
        result.phases.append(restarting.Phase(name, clock() - started, detail))

    t = clock()
    targets = Targets(app=app, app_spec=app_spec, supervisor_url=server.url, programs=tuple(result.processes),
                      timeout=timeout, supervisor_auth=(server.username, server.password))
    result.save = saved = savepid(path, targets, Policy())
    if saved.snapshot.workers and not saved.snapshot.source.startswith("supervisor"):
        # discovery fell back to a scan, which would also record other programs' workers
        raise SupervisorError(server.url, "did not say which processes these programs run; nothing was stopped")
    result.warnings += saved.warnings
    result.nodes = list(dict.fromkeys(w.node for w in saved.snapshot.workers if w.node))
    phase(restarting.SAVEPID, t, f"{len(saved.snapshot.workers)} worker(s), "
          f"{sum(len(w.procs) for w in saved.snapshot.workers)} process(es), "
          f"{sum(len(w.tasks) for w in saved.snapshot.workers)} active task(s)")

    t = clock()
    cancels = restarting.CancelClock(remote_factory, clock)
    if result.nodes:
        result.drain = drained = drain(app, app_spec, destinations=result.nodes, timeout=drain_timeout,
                                       on_progress=on_drain, remote_factory=cancels)
        result.warnings += drained.warnings
        phase(restarting.DRAIN, t, f"{len(drained.targets)} worker(s) "
              + ("drained" if drained.drained else f"still hold {len(drained.held)} task(s)"))
        if not drained.drained:
            result.problem = (
                f"the drain timed out after {drained.elapsed:.1f}s: nothing was stopped, the workers finish "
                "their tasks but no longer consume their queues; run restart again (with a longer "
                "--drain-timeout) to finish, or `celery control add_consumer` to resume"
            )
            return
    else:
        phase(restarting.DRAIN, t, "no worker running; nothing to drain")

    t = clock()
    # One call per process, all at once: each blocks until its process has
    # exited (or started), and one slow worker should not hold up the rest.
    was_running = [name for name, running in zip(result.processes, side_by_side(rpc.stop_process, server, result.processes))
                   if running]
    result.stopped = True
    phase(restarting.STOP, t, f"{len(was_running)} of {len(result.processes)} process(es) were running")

    t = clock()
    result.kill = killed = kill(path, grace=grace, app_spec=app_spec, on_wait=on_wait)
    result.warnings += killed.warnings
    phase(restarting.KILL, t, _kill_summary(killed))

    t = started_at = clock()
    # new_nodes counts from here: supervisord spawns the process at once and
    # only then waits out startsecs, so the worker's own start-up (spawn to
    # first answer) spans both the start and the ready phases.
    pids = dict(zip(result.processes, side_by_side(rpc.start_process, server, result.processes)))
    result.started = True
    phase(restarting.START, t, ", ".join(f"{name} PID {pid}" for name, pid in pids.items()))

    t = clock()
    with remote_factory(app) as remote:
        answered, silent = restarting.wait_answering(remote.ping, lambda: worker_nodes(pids.values(), app_spec),
                                                     started_at + start_timeout, clock=clock)
    result.new_nodes = {n: at - started_at for n, at in answered.items()}
    result.new_nodes.update({n: None for n in silent})
    if cancels.sent_at is not None:
        result.consume_gaps = {n: at - cancels.sent_at for n, at in answered.items()}
    phase(restarting.READY, t, f"{len(answered)} worker(s) answered a ping"
          + (f"; not: {', '.join(silent)}" if silent else ""))
    problems = []
    if killed.partial:
        problems.append("some leftovers of the old workers could not be killed (see the kill report)")
    if silent:
        problems.append(f"the new workers did not answer a ping within {start_timeout:g}s: {', '.join(silent)}")
    result.problem = "; ".join(problems) or None


def side_by_side(call, server, names: list[str], *, on_wait: Callable[[int, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> list:
    """``[call(server, name) for name in names]``, run side by side; the first error is raised.

    Each call of supervisord's ``stopProcess``/``startProcess`` with
    ``wait=True`` blocks until its process has stopped (or started), and one
    slow worker should not hold up the rest. *on_wait(left, elapsed)* is
    called about once a second while calls are still running.
    """
    if len(names) < 2 and on_wait is None:
        return [call(server, name) for name in names]
    started = clock()
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        futures = [pool.submit(call, server, name) for name in names]
        while on_wait is not None:
            _, pending = wait(futures, timeout=1.0)
            if not pending:
                break
            on_wait(len(pending), clock() - started)
        return [f.result() for f in futures]


def worker_nodes(pids: Iterable[int], app_spec: str | None) -> list[str]:
    """Node names of the Celery workers of *app_spec* running at, or below, each of *pids*.

    A supervisord program may run the worker through a shell or wrapper; a
    process that has not exec'd Celery yet has no node name, so callers ask
    again until every one has.
    """
    nodes = []
    for pid in pids:
        main = discovery.worker_main_under(pid, app_spec)
        p = procs.read_proc(main) if main else None
        command = discovery.parse_worker_cmdline(p.cmdline) if p else None
        if command is not None and command.node not in nodes:
            nodes.append(command.node)
    return nodes


def _kill_summary(report: KillReport) -> str:
    count = {s: len(report.by_status(s)) for s in (KILLED, SPARED, GONE, FAILED)}
    return f"killed {count[KILLED]}, spared {count[SPARED]}, already gone {count[GONE]}, failed {count[FAILED]}"


__all__ = ["Targets", "savepid", "kill", "status", "drain", "restart", "SaveResult", "StatusResult",
           "protected_pids", "side_by_side", "worker_nodes", "with_group_orphans"]
