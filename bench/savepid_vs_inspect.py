"""The commands that talk to the broker, as whole commands: against what users run, and against the floor.

Every command is timed as a user meets it in a supervisord ``stopwaitsecs``
budget: the wall time of a fresh process, imports and broker connection
included, and its CPU time (user + system, from ``wait4``), run from
``django_app/`` against one running worker of the demo project (``celery -A
demo worker -c 2 -n bench@%h``) on one broker. Three comparisons:

* ``celery-supervise savepid`` against ``celery inspect active``, what users
  run today. ``inspect active`` waits its whole ``--timeout`` (1 s) for
  replies, because it does not know how many workers there are;
  ``savepid`` first finds the local workers, then asks them with ``limit``
  set, so it returns as soon as they have all answered.
* ``savepid`` and ``status`` against **the floor**: the shortest Python
  that makes the same round trips with the same app and worker,
  ``python -c`` importing the app (``from demo.celery import app``) and
  asking ``inspect(limit=1, timeout=2).stats()`` and ``.active()`` over one
  connection (savepid and status need both answers: ``stats`` names the
  worker's PID and pool, ``active`` its tasks). What we do beyond that
  (finding the workers, reading their trees, the verdicts, the file, the
  CLI and its output) is our overhead. Target: ≤ 1.2× the floor, in wall
  time and in CPU time.
* ``celery-supervise requeue FILE`` against its floor: the same
  ``python -c`` sending the recorded task once with ``app.send_task(name,
  args, task_id=..., queue=...)``. The record (written here, for the live
  worker's tree) holds one finished-looking task of ``demo.tasks.add``
  routed to a queue of this run's own that no worker consumes, so neither
  side's message runs; each requeue run gets a fresh copy of the record
  (and so an empty ledger, and sends it again). Reported, no target.

All the commands rotate in order from one repeat to the next, after one
unmeasured warm-up run of each. The worker is started here and waited for
by a ping with a deadline; it is stopped by PID (TERM, wait, KILL) and so
is anything left below it. The run's queue is deleted from Redis at the end.

Everything runs in a private copy of ``django_app/`` (its code, not its
``var/``). savepid finds workers by scanning this host for ``-A demo``
workers of *the same project folder*; other sessions' end-to-end tests run
demo workers from ``django_app/`` on brokers of their own, and savepid would
wait out its ``--timeout`` for their replies. In the copy, only our worker is
ours. (That cost is real, see the README: a same-project worker on another
broker costs savepid its whole timeout.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .forest import MARK_ENV
from .measure import Child, Row, Target, format_value, median, order, run_child

REPO = Path(__file__).resolve().parent.parent
SOURCE_PROJECT = REPO / "django_app"
BIN = Path(sys.executable).parent
CELERY = str(BIN / "celery")
SUPERVISE = str(BIN / "celery-supervise")

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
NODE = f"bench@{socket.gethostname()}"
READY_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: The worker's bounded lifetime: a watchdog TERMs it after this long (and
#: KILLs it 10 s later) even if this benchmark dies without cleaning up.
WORKER_LIFETIME = 300

# The watchdog holds a pidfd on the worker: it signals that very process or
# nobody, and exits as soon as the worker does. (A forking wrapper such as
# coreutils `timeout` would not do: its own command line names a celery
# worker, and savepid's scan takes it for a second worker.)
WATCHDOG = """
import os, select, signal, sys
fd = os.pidfd_open(int(sys.argv[1]))
for sig, wait in ((signal.SIGTERM, float(sys.argv[2])), (signal.SIGKILL, 10.0)):
    if select.select([fd], [], [], wait)[0]:
        break
    signal.pidfd_send_signal(fd, sig)
"""
TARGET = Target(ratio=0.3)
FLOOR_TARGET = Target(ratio=1.2)
#: Seconds to wait for each broker reply: savepid's and status's default, and the floor's.
REPLY_TIMEOUT = 2.0

# The floor of savepid and status: the app, one connection, the two answers
# they need. Run from the project folder, like `celery -A`.
FLOOR_INSPECT = """
import os, sys
sys.path.insert(0, os.getcwd())
from demo.celery import app
inspect = app.control.inspect(limit=1, timeout=float(sys.argv[1]))
stats, active = inspect.stats(), inspect.active()
sys.exit(0 if stats and active is not None else 1)
"""

# The floor of requeue: send the recorded task once.
FLOOR_SEND = """
import json, os, sys
sys.path.insert(0, os.getcwd())
from demo.celery import app
app.send_task(sys.argv[1], args=json.loads(sys.argv[2]), task_id=sys.argv[3], queue=sys.argv[4])
"""


class Unavailable(Exception):
    """This row cannot be measured here (no broker, no project, no worker)."""


@dataclass
class Broker:
    label: str
    env: dict  # the worker's and both commands' environment
    app_conf: dict  # for the in-process ping app


def project_ready() -> bool:
    return all((SOURCE_PROJECT / p).exists() for p in ("demo/celery.py", "demo/settings.py", "demo/__init__.py"))


def wait_for_project(timeout: float) -> bool:
    """Wait (up to *timeout* s) for the example project to exist; another helper may be writing it."""
    deadline = time.monotonic() + timeout
    while not project_ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(5)
    return True


def _base_env(run_id: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DJANGO_SETTINGS"))}
    env[MARK_ENV] = run_id
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DJANGO_SETTINGS_MODULE"] = "demo.settings"
    return env


def redis_broker(run_id: str) -> Broker:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
    except Exception as exc:
        raise Unavailable(f"Redis is not reachable at {REDIS_URL} ({type(exc).__name__}: {exc})") from None
    env = _base_env(run_id)
    env["CELERY_BROKER_URL"] = REDIS_URL
    return Broker(f"Redis ({REDIS_URL})", env, {"broker_url": REDIS_URL})


def filesystem_broker(run_id: str, folder: str) -> Broker:
    from celery_supervise.celery_side.fs_transport import TRANSPORT_PATH, filesystem_broker_options

    env = _base_env(run_id)
    env["CELERY_SUPERVISE_BROKER_DIR"] = folder
    conf = {
        "broker_url": "filesystem://",
        "broker_transport": TRANSPORT_PATH,
        "broker_transport_options": filesystem_broker_options(folder),
    }
    return Broker("filesystem transport", env, conf)


class Worker:
    """``celery -A demo worker`` on *broker*, ready once it answers a ping.

    It runs in a session of its own, watched by a watchdog process that
    bounds its life to :data:`WORKER_LIFETIME` seconds.
    """

    def __init__(self, broker: Broker, project: str, log_path: str):
        self.broker = broker
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [CELERY, "-A", "demo", "worker", "-c", "2", "-n", "bench@%h", "-l", "info"],
            cwd=project, env=broker.env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(self.proc.pid), str(WORKER_LIFETIME)],
            env=broker.env, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _tail(self, lines: int = 15) -> str:
        with open(self.log_path, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        from celery import Celery

        app = Celery("bench-ping", set_as_current=False)
        app.conf.update(self.broker.app_conf)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while True:
                if self.proc.poll() is not None:
                    raise Unavailable(f"the worker exited with {self.proc.returncode}:\n{self._tail()}")
                try:
                    if app.control.ping(destination=[NODE], timeout=0.5):
                        return
                except Exception:  # the broker may refuse until it is set up; retry until the deadline
                    time.sleep(0.2)
                if time.monotonic() >= deadline:
                    raise Unavailable(f"the worker did not answer a ping within {READY_TIMEOUT} s:\n{self._tail()}")
        finally:
            app.close()

    def stop(self) -> None:
        """TERM the worker main by PID, wait, then KILL; then KILL anything of its tree left."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)  # its pool processes
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.terminate()  # our own unreaped child: its PID cannot have been reused
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.watchdog.wait(5)  # it exits once the worker has
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            self.watchdog.wait()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self._log.close()


def _run(cmd: list[str], env: dict, cwd: str) -> Child:
    return run_child(cmd, cwd=cwd, env=env, timeout=COMMAND_TIMEOUT)


def _short(text: bytes) -> str:
    return " ".join(text.decode(errors="replace").split())[-300:]


def copy_project(workdir: str) -> str:
    """A private copy of the demo project's code (see the module docstring)."""
    dst = os.path.join(workdir, "django_app")
    shutil.copytree(SOURCE_PROJECT, dst, ignore=shutil.ignore_patterns("var", "__pycache__", "*.pyc", "*.sqlite3"))
    os.makedirs(os.path.join(dst, "var"))
    return dst


@dataclass
class Requeue:
    """A record of the live worker holding one task to send again, on a queue nobody consumes."""

    path: str
    task: str
    args: list
    task_id: str
    queue: str


def write_requeue_record(workdir: str, worker_pid: int, run_id: str) -> Requeue:
    from celery_supervise.processes import plan, snapshot, statefile

    queue = f"bench-requeue-{run_id[:12]}"
    task = snapshot.Task(id=f"bench-requeue-{run_id[:12]}", name="demo.tasks.add", args=[2, 3], kwargs={},
                         delivery_info={"exchange": "", "routing_key": queue}, acknowledged=True,
                         time_start=time.time(), hostname=NODE)
    worker = snapshot.read_worker(worker_pid, node=NODE, app="demo", tasks=[task])
    if worker is None:
        raise Unavailable("the worker exited before its record was written")
    policy = plan.Policy()
    path = os.path.join(workdir, "requeue-template.json")
    statefile.write(path, statefile.to_document(snapshot.take([worker], "control"), policy,
                                                plan.plan([worker], policy)))
    return Requeue(path, task.name, list(task.args), task.id, queue)


def _fresh_copy(record: Requeue, workdir: str, i: int) -> str:
    """The record in a folder of its own: its ledger (kept beside it) starts empty."""
    folder = os.path.join(workdir, f"requeue-{i}")
    os.mkdir(folder, 0o700)
    path = os.path.join(folder, "state.json")
    shutil.copy(record.path, path)
    os.chmod(path, 0o600)
    return path


def measure(broker: Broker, repeats: int, workdir: str, project: str, run_id: str) -> list[Row]:
    state = os.path.join(workdir, "state.json")
    worker = Worker(broker, project, os.path.join(workdir, "worker.log"))
    try:
        record = write_requeue_record(workdir, worker.proc.pid, run_id)
        commands = {
            "savepid": lambda i: [SUPERVISE, "-A", "demo", "savepid", state],
            "inspect": lambda i: [CELERY, "-A", "demo", "inspect", "active"],
            "status": lambda i: [SUPERVISE, "-A", "demo", "status"],
            "floor": lambda i: [sys.executable, "-c", FLOOR_INSPECT, str(REPLY_TIMEOUT)],
            "requeue": lambda i: [SUPERVISE, "-A", "demo", "requeue", _fresh_copy(record, workdir, i)],
            "send": lambda i: [sys.executable, "-c", FLOOR_SEND, record.task, json.dumps(record.args),
                               record.task_id, record.queue],
        }
        runs: dict[str, list[Child]] = {name: [] for name in commands}
        failures = []
        for name, argv in commands.items():  # warm-up: .pyc, page cache
            _run(argv(-1), broker.env, project)
        for i in range(repeats):
            for name in order(i, tuple(commands)):
                done = _run(commands[name](i), broker.env, project)
                runs[name].append(done)
                if done.returncode != 0:
                    failures.append(f"{name} exited {done.returncode}: {_short(done.stderr or done.stdout)}")
                elif name == "inspect" and NODE.encode() not in done.stdout:
                    failures.append(f"inspect did not list {NODE}'s reply: {_short(done.stdout + done.stderr)}")
        with open(state) as f:
            doc = json.load(f)
    finally:
        worker.stop()
        _forget_queue(broker, run_id)

    def wall(name):
        return [c.wall for c in runs[name]]

    def cpu(name):
        return [c.cpu for c in runs[name]]

    floor_label = "python -c: import the app, inspect(limit=1).stats() + .active()"
    send_label = "python -c: import the app, send_task(...) once"
    rows = [
        Row(f"savepid vs inspect, {broker.label}", "celery-supervise -A demo savepid FILE",
            "celery -A demo inspect active", TARGET, ours=wall("savepid"), baseline=wall("inspect")),
        Row(f"savepid vs the floor, wall, {broker.label}", "celery-supervise -A demo savepid FILE", floor_label,
            FLOOR_TARGET, ours=wall("savepid"), baseline=wall("floor")),
        Row(f"savepid vs the floor, CPU (user+sys), {broker.label}", "celery-supervise -A demo savepid FILE",
            floor_label, FLOOR_TARGET, ours=cpu("savepid"), baseline=cpu("floor")),
        Row(f"status vs the floor, wall, {broker.label}", "celery-supervise -A demo status", floor_label,
            FLOOR_TARGET, ours=wall("status"), baseline=wall("floor")),
        Row(f"status vs the floor, CPU (user+sys), {broker.label}", "celery-supervise -A demo status", floor_label,
            FLOOR_TARGET, ours=cpu("status"), baseline=cpu("floor")),
        Row(f"requeue vs the floor, wall, {broker.label}", "celery-supervise -A demo requeue FILE", send_label,
            Target(), ours=wall("requeue"), baseline=wall("send")),
        Row(f"requeue vs the floor, CPU (user+sys), {broker.label}", "celery-supervise -A demo requeue FILE",
            send_label, Target(), ours=cpu("requeue"), baseline=cpu("send")),
    ]
    workers = doc.get("workers", [])
    rows[0].notes.append(
        f"{broker.label}: savepid recorded {len(workers)} worker(s) "
        f"({sum(len(w['procs']) for w in workers)} processes), source={doc.get('source')!r}"
        + (f", warnings: {'; '.join(doc['warnings'])}" if doc.get("warnings") else "")
    )
    # What the 0.3× target leaves us here: inspect's 1 s timeout is fixed,
    # but Python's start-up and the app's import stretch with the load, for
    # the floor as for us.
    floor, inspect = median(wall("floor")), median(wall("inspect"))
    rows[0].notes.append(f"the floor ({format_value(floor)}) is itself {floor / inspect:.2f}× inspect active; "
                         f"0.3× leaves savepid {0.3 * inspect / floor:.2f}× the floor")
    rows[1].notes.append("the floor makes savepid's two round trips (stats, active) and nothing else; "
                         f"same worker, same broker, reply timeout {REPLY_TIMEOUT:g} s with limit=1 on both sides")
    rows[0].notes.extend(dict.fromkeys(failures))
    return rows


def _forget_queue(broker: Broker, run_id: str) -> None:
    """Delete this run's requeue queue (and its bindings) from Redis."""
    if not broker.env.get("CELERY_BROKER_URL", "").startswith("redis"):
        return
    sys.path.insert(0, str(REPO / "tests"))
    from brokers import clean_redis

    clean_redis(broker.env["CELERY_BROKER_URL"], f"bench-requeue-{run_id[:12]}")


def run(run_id: str, quick: bool = False, project_timeout: float = 1800.0) -> list[Row]:
    repeats = 5 if quick else 9
    if not wait_for_project(project_timeout):
        return [Row("savepid vs inspect", "celery-supervise savepid", "celery inspect active", TARGET,
                    skipped=f"{SOURCE_PROJECT} has no demo project")]
    rows = []
    workdir = tempfile.mkdtemp(prefix="celery-supervise-bench-")
    try:
        project = copy_project(workdir)
        makers = [("Redis", lambda: redis_broker(run_id))]
        if not quick:
            makers.append(("filesystem transport", lambda: filesystem_broker(run_id, os.path.join(workdir, "broker"))))
        for label, make in makers:
            folder = os.path.join(workdir, label.split()[0].lower())
            os.mkdir(folder)
            try:
                rows.extend(measure(make(), repeats, folder, project, run_id))
            except Unavailable as exc:
                rows.append(Row(f"savepid vs inspect, {label}", "celery-supervise savepid",
                                "celery inspect active", TARGET, skipped=str(exc)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows
