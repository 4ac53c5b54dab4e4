"""Finding this host's Celery workers, and only ours.

Three sources, tried in this order of authority:

1. supervisord's XML-RPC (``--supervisor-url``/``--program``): the PIDs of
   the programs it runs;
2. a scan of local processes for ``celery ... worker`` command lines that
   name our app (``-A``/``--app`` or ``CELERY_APP``);
3. Celery's remote control (``-A`` and a broker that answers): ``stats()``
   confirms each worker and names its pool processes, ``active()`` gives
   its tasks.

A broker reply is never trusted on its own: its PID must be a live local
worker of our app whose node name matches, and either its start time agrees
with the reply's ``uptime`` or the reply's pool processes are its children
here (:func:`reply_is_ours`). Replies from other hosts or containers name
PIDs that mean something else here (PID 1 included) and are ignored.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Iterable

import psutil

from ..errors import BrokerError, SupervisorError
from ..processes import procs
from ..processes.snapshot import Task
from . import control

# A worker's uptime counts from WorkController.__init__, after imports and
# Django set-up; allow that much start-up delay, plus rounding.
UPTIME_EARLY = 2.0
UPTIME_LATE = 300.0


@dataclass(frozen=True)
class WorkerCommand:
    """What a ``celery ... worker`` command line says about its worker."""

    app: str | None
    node: str
    queues: tuple[str, ...] = ()


@dataclass(frozen=True)
class Found:
    pid: int
    command: WorkerCommand
    program: str | None = None
    supervisor_pid: int | None = None
    pool_pids: tuple[int, ...] = ()
    tasks: tuple[Task, ...] = ()
    confirmed: bool = False  # the broker answered for it


@dataclass
class Discovery:
    workers: list[Found]
    source: str
    warnings: list[str] = field(default_factory=list)
    # Set when -A was given, workers were found and the broker failed: their tasks are missing.
    broker_error: str | None = None


# ------------------------------------------------------------- command lines


def _option(args: list[str], short: str | None, long: str) -> str | None:
    for i, a in enumerate(args):
        if a == long or (short and a == short):
            return args[i + 1] if i + 1 < len(args) else None
        if a.startswith(long + "="):
            return a.split("=", 1)[1]
        if short and a.startswith(short) and len(a) > len(short) and not a.startswith("--"):
            return a[len(short):]
    return None


def celery_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``celery`` when *argv* runs Celery itself, else ``None``.

    Only ``celery …``, ``python [opts] /path/celery …`` and ``python -m celery …``
    count. A wrapper such as ``timeout 90 celery … worker`` or ``sudo -u x
    celery …`` merely mentions celery: it forks the real worker, which is
    found on its own.
    """
    if not argv:
        return None
    if os.path.basename(argv[0]) == "celery":
        return argv[1:]
    if not os.path.basename(argv[0]).startswith("python"):
        return None
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 1
    if i + 1 < len(argv) and argv[i] == "-m" and argv[i + 1] == "celery":
        return argv[i + 2:]
    if i < len(argv) and os.path.basename(argv[i]) == "celery":
        return argv[i + 1:]
    return None


def may_become_worker(cmdline: Iterable[str]) -> bool:
    """Whether *cmdline* mentions running a Celery worker: a wrapper that may exec one (or fork it).

    ``celery-supervise contain -- celery … worker``, ``newrelic-admin
    run-program celery … worker``, ``sh -c "…; exec celery … worker"``: some
    word is ``celery`` (or ends in ``/celery``) and some word is ``worker``.
    Only a hint, for the listener to look again; a record is made only once
    :func:`parse_worker_cmdline` reads a worker.
    """
    words = [w for arg in cmdline for w in arg.split()]
    return "worker" in words and any(os.path.basename(w) == "celery" for w in words)


def runs_worker_wrapper(pid: int) -> bool:
    """:func:`may_become_worker` of the live process *pid* (``False`` once it is gone)."""
    p = procs.read_proc(pid)
    return p is not None and may_become_worker(p.cmdline)


def parse_worker_cmdline(cmdline: Iterable[str], environ: dict | None = None) -> WorkerCommand | None:
    """Parse ``[python] celery [-A app] worker [opts]``; ``None`` if not a worker."""
    from celery.utils.nodenames import default_nodename, host_format

    args = celery_arguments(list(cmdline))
    if args is None or "worker" not in args:
        return None
    app = _option(args, "-A", "--app") or (environ or {}).get("CELERY_APP")
    node = _option(args, "-n", "--hostname")
    queues = _option(args, "-Q", "--queues")
    return WorkerCommand(
        app=app,
        node=host_format(default_nodename(node)),
        queues=tuple(q for q in (queues or "").split(",") if q),
    )


def app_module(spec: str) -> str:
    """``demo.celery:app`` -> ``demo.celery``; ``demo.celery.app`` stays (a prefix test copes)."""
    return spec.split(":", 1)[0]


def app_names_match(worker_app: str | None, wanted: str) -> bool:
    """Whether a worker's ``-A`` names the app we want (same module tree).

    ``-A demo`` and ``demo.celery:app`` are one app (Celery looks up
    ``demo.celery``); ``demo`` and ``demo2`` are not.
    """
    if not worker_app:
        return False
    a, b = app_module(worker_app), app_module(wanted)
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def app_root(spec: str) -> str | None:
    """The folder our app's top-level package was imported from, or would be.

    Where it was, if loaded; else where an import would find it, the
    current directory first (as ``celery -A`` and
    :func:`celery_supervise.celery_side.control.load_app` look), without running it.
    ``None`` when it cannot be found.
    """
    top = app_module(spec).split(".")[0]
    mod = sys.modules.get(top)
    path = getattr(mod, "__file__", None)
    if mod is None and top:
        try:
            found = importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path])
        except (ImportError, ValueError):
            found = None
        path = found.origin if found is not None and found.has_location else None
    if not path:
        return None
    path = os.path.dirname(os.path.realpath(path))
    return os.path.dirname(path) if os.path.basename(path) == top else path


def same_project(proc: psutil.Process, command: WorkerCommand, wanted: str, root: str | None) -> bool:
    """Name match, and where the worker's app sits in its cwd, the same folder.

    Two projects on one host may both call their app ``proj``; the one
    whose package lives in another folder is not ours.
    """
    if not app_names_match(command.app, wanted):
        return False
    if root is None:
        return True
    top = app_module(command.app or "").split(".")[0]
    try:
        cwd = proc.cwd()
    except (psutil.Error, OSError):
        return True  # nothing to compare; the name matched
    here = [p for p in (os.path.join(cwd, top), os.path.join(cwd, top + ".py")) if os.path.exists(p)]
    if not here:
        return True  # imported from site-packages or PYTHONPATH
    return os.path.realpath(cwd) == root


# ------------------------------------------------------------------ the scan


def scan(wanted_app: str | None = None, root: str | None = None) -> dict[int, WorkerCommand]:
    """Local worker *main* processes, by PID, optionally only our app's.

    Pool processes are forks with the very same command line; a worker
    process whose parent runs the same command line is a pool process.
    """
    workers: dict[int, tuple[int, tuple[str, ...], WorkerCommand]] = {}
    for pid, ppid, cmdline in procs.iter_cmdlines(b"worker"):
        if "worker" not in cmdline:
            continue
        env = None
        if not any(a in ("-A", "--app") or a.startswith(("--app=", "-A")) for a in cmdline):
            try:
                env = psutil.Process(pid).environ()
            except psutil.Error:
                env = None
        command = parse_worker_cmdline(cmdline, env)
        if command is None:
            continue
        workers[pid] = (ppid, cmdline, command)
    mains = {}
    for pid, (ppid, cmdline, command) in workers.items():
        parent = workers.get(ppid)
        if parent is not None and parent[1] == cmdline:
            continue  # a pool process
        if wanted_app is not None:
            try:
                if not same_project(psutil.Process(pid), command, wanted_app, root):
                    continue
            except psutil.NoSuchProcess:
                continue
        mains[pid] = command
    return mains


def worker_main_under(pid: int, wanted_app: str | None = None) -> int | None:
    """*pid* if it is a worker main (of *wanted_app*), else the first such below it.

    A supervisord program may run the worker directly or through a shell or
    wrapper script.
    """
    root = procs.read_proc(pid)
    if root is None:
        return None
    for p in (root, *procs.walk(root)):
        command = parse_worker_cmdline(p.cmdline)
        if command is not None and (wanted_app is None or app_names_match(command.app, wanted_app)):
            return p.pid
    return None


# ---------------------------------------------------------------- supervisor


def from_supervisor(url: str, programs: list[str], local: dict[int, WorkerCommand],
                    auth: tuple[str | None, str | None] = (None, None)) -> tuple[list[Found], list[str]]:
    """Workers run by supervisord's matching programs."""
    from ..supervisord import rpc  # supervisor's XML-RPC stack is slow to import; most runs never need it

    sup_pid, running = rpc.program_processes(url, programs, *auth)
    sup = procs.read_proc(sup_pid)
    if sup is None or not procs.runs_supervisord(sup.cmdline):
        # A supervisord in another PID namespace (a container's socket
        # reached from the host, or the other way round) gives PIDs that
        # name other processes here, or none.
        here = "no process" if sup is None else f"{sup.name!r}"
        raise SupervisorError(url, f"says its PID is {sup_pid}, but PID {sup_pid} here is {here}, not supervisord: "
                              "it runs in another PID namespace (a container?), whose PIDs mean something else "
                              "here; run this command inside it")
    found, warnings = [], []
    for pp in running:
        # supervisord forks each program process itself: a PID that is not its
        # child here names another tree (below PID 1: the whole machine's).
        root = procs.read_proc(pp.pid)
        if root is not None and root.ppid != sup_pid:
            warnings.append(f"program {pp.name}: PID {pp.pid} is not supervisord's child here; skipped")
            continue
        mains = workers_under(pp.pid, local)
        if not mains:
            warnings.append(f"program {pp.name} (PID {pp.pid}) runs no Celery worker of this app; skipped")
        for pid in mains:
            found.append(Found(pid, local[pid], program=pp.name, supervisor_pid=sup_pid))
    return found, warnings


def workers_under(pid: int, local: dict[int, WorkerCommand]) -> list[int]:
    """The worker mains of *local* that a supervisord process *pid* runs: itself, or below it.

    A program may run a shell or wrapper that starts the worker.
    """
    if pid in local:
        return [pid]
    root = procs.read_proc(pid)
    return [] if root is None else [p.pid for p in procs.walk(root) if p.pid in local]


# ----------------------------------------------------------------- confirm


def start_time_agrees(create_time: float, uptime: float, now: float) -> bool:
    started = now - uptime
    return -UPTIME_EARLY <= started - create_time <= UPTIME_LATE


def pool_agrees(pid: int, pool: Iterable[int]) -> bool:
    """Whether the reply's pool processes are all live children of *pid* here (and there are some)."""
    pool = set(pool)
    return bool(pool) and pool <= set(procs.child_pids(pid))


def reply_is_ours(f: Found, node: str, reply: dict, now: float) -> bool:
    """Whether a ``stats`` reply from *node* comes from the local worker *f*, not a namesake elsewhere.

    The node name and the PID must match; then one of two pieces of
    evidence that a reply from another host or container (whose PIDs mean
    something else here) cannot give by chance:

    * its start time: ``now - uptime`` agrees with the creation time of
      the process here;
    * its pool: every pool process the reply names is a live child of
      that PID here.

    The start time alone is not enough. Celery counts ``uptime`` on the
    wall clock (``datetime.now()`` at start-up, and again at the reply),
    while the age of the process here comes from the kernel's count since
    boot, which nobody sets. Once the wall clock is set ahead while the
    worker runs (an NTP step after boot, a resumed VM, an admin), every
    reply of the real worker claims a start before its process existed:
    the reply was ignored and the record lost the worker's active tasks,
    for as long as the worker lived. The pool PIDs depend on no clock (a
    prefork worker, Celery's default, always names them).
    """
    pid = reply.get("pid")
    if not isinstance(pid, int) or pid != f.pid or f.command.node != node:
        return False
    created = procs.live_identity(pid)  # the identity every other check uses
    if created is None:
        return False
    try:
        if start_time_agrees(created, float(reply.get("uptime", -1e9)), now):
            return True
    except (TypeError, ValueError):
        pass
    pool = reply.get("pool")
    pool = pool.get("processes") if isinstance(pool, dict) else None
    return isinstance(pool, (list, tuple)) and all(isinstance(p, int) for p in pool) and pool_agrees(pid, pool)


def confirm_with_broker(app, found: list[Found], timeout: float, want_tasks: bool = True) -> tuple[list[Found], list[str]]:
    """Ask the broker about *found*; attach pool PIDs and tasks to confirmed workers."""
    nodes = [f.command.node for f in found]
    unique_nodes = nodes if len(set(nodes)) == len(nodes) else None
    warnings: list[str] = []
    conn = control.connect(app)
    try:
        stats = control.inspect(app, conn, "stats", nodes=unique_nodes, expected=len(found), timeout=timeout)
        by_pid = {f.pid: f for f in found}
        now = time.time()
        confirmed: dict[int, Found] = {}
        for node, reply in stats.items():
            pid = reply.get("pid") if isinstance(reply, dict) else None
            f = by_pid.get(pid) if isinstance(pid, int) else None
            if f is None or not reply_is_ours(f, node, reply, now):
                warnings.append(f"ignored reply from {node}: PID {pid} is not that worker on this host")
                continue
            pool = (reply.get("pool") or {}).get("processes") or ()
            confirmed[pid] = replace(f, pool_pids=tuple(p for p in pool if isinstance(p, int)), confirmed=True)
        if want_tasks and confirmed:
            cnodes = [confirmed[p].command.node for p in confirmed]
            active = control.inspect(app, conn, "active", nodes=cnodes, expected=len(cnodes), timeout=timeout)
            for pid, f in list(confirmed.items()):
                tasks = active.get(f.command.node)
                if tasks is None:
                    warnings.append(f"worker {f.command.node} (PID {pid}) did not report its active tasks")
                    continue
                confirmed[pid] = replace(f, tasks=tuple(Task.from_reply(t) for t in tasks if isinstance(t, dict)))
    finally:
        conn.release()
    out = []
    for f in found:
        if f.pid in confirmed:
            out.append(confirmed[f.pid])
        else:
            warnings.append(f"worker {f.command.node} (PID {f.pid}) did not answer the broker; its tasks are not recorded")
            out.append(f)
    return out, warnings


def discover(
    *,
    app=None,
    app_spec: str | None = None,
    supervisor_url: str | None = None,
    programs: list[str] = (),
    timeout: float = 2.0,
    want_tasks: bool = True,
    supervisor_auth: tuple[str | None, str | None] = (None, None),
) -> Discovery:
    """Find this host's workers of *app_spec* (all workers when ``None``)."""
    root = app_root(app_spec) if app_spec else None
    local = scan(app_spec, root)
    warnings: list[str] = []
    found: list[Found] | None = None
    source = "scan"
    broker_error = None
    if supervisor_url:
        # No fallback to a scan when supervisord does not answer: the URL is
        # what says which workers are ours, and without -A a scan would take
        # every Celery worker on the host, other projects' too, for ours.
        found, w = from_supervisor(supervisor_url, list(programs), local, supervisor_auth)
        warnings += w
        source = "supervisor"
    if found is None:
        found = [Found(pid, cmd) for pid, cmd in sorted(local.items())]
    if app is not None and found:
        try:
            found, w = confirm_with_broker(app, found, timeout, want_tasks)
            warnings += w
            if any(f.confirmed for f in found):
                source = "control" if source == "scan" else f"{source}+control"
        except BrokerError as exc:
            broker_error = str(exc)
    if source == "scan" and found:
        warnings.append("found the workers by scanning local processes (no broker or supervisord answered)")
    return Discovery(found, source, warnings, broker_error)
