"""Soak: restart a real worker under a real supervisord, again and again, and count what went wrong.

    python bench/soak.py [--cycles 200] [--quick] [--broker redis|filesystem] [--seed 1] [--json]
    python bench/soak.py --chaos [--cycles 1000] [--seed S] [--json]

One supervisord (the tests' harness, ``tests/realsupervisor.py``) runs the
demo worker (``-c 3``, ``stopsignal=TERM``, ``stopwaitsecs=30``) from a
private copy of ``django_app/``, the celery-supervise eventlistener as
``conf/supervisord.conf`` configures it (priority 100 below the worker's
200, ``--grace 10``) and a non-Celery ``bystander`` program (``sleep``).
Each cycle sends tasks, restarts the worker one of four ways, in turn:

1. ``deploy``: ``scripts/deploy.sh -c CONF -A demo -s STATE`` (savepid,
   ``supervisorctl shutdown``, kill, a new daemonized supervisord), then
   ``celery-supervise requeue STATE``;
2. ``restart``: ``celery-supervise restart celery-worker --state STATE``,
   then ``requeue STATE``;
3. ``supervisorctl``: ``supervisorctl restart celery-worker:*``; the listener
   reaps the old tree when the old worker exits (no state file, no requeue);
4. ``kill-9``: SIGKILL of supervisord (the worker and its tree are orphaned,
   the listener exits at end of input), ``celery-supervise savepid STATE``
   of the orphan, a new supervisord; its listener's start sweep warm-stops
   the orphan (``--grace``) and kills its leftovers (README, "The
   eventlistener"); then ``requeue STATE``.

and then counts, once the new worker answers and every task has had its
chance to finish:

* **attached leaked**: the old worker's main and pool processes and the
  attached children of its tasks (``spawn_family``'s plain ones, and the
  attached one of each ``spawn_escapes`` an ``escape-*`` fault ran) still
  alive 15 s after the cycle settled, plus any other process carrying the
  run's environment mark that is neither under the current supervisord nor
  one the soak watches;
* **detached killed**: ``nohup``'d and ``setsid``'d task children
  (``spawn_family``'s and ``spawn_escapes``'s, all ever started, checked
  at every cycle's end until they are retired) found
  gone before their own lifetime (``sleep LIFETIME``) ran out, by PID +
  creation time;
* **tasks lost**: tasks sent whose ``.done`` marker never appeared (60 s
  after the cycle settled); a task ``requeue`` sent again counts as done
  only once its re-run has written the marker; one whose message is still
  in Redis' unacked set (a worker had it prefetched when it, or its broker,
  was killed: Redis delivers it again after ``visibility_timeout``) is
  shown as *held by the broker* instead;
* **innocents killed**: bystanders, each cycle a ``sleep`` child of the
  soak and a ``setsid``'d one, and the ``bystander`` program's ``sleep``
  (in ``kill-9`` cycles the orphaned one), found gone before their lifetime.

* **audit lines missing**: every cycle also runs ``spawn_witnesses``,
  whose attached child (``django_app/demo/witness.py``) writes down each
  signal it receives and its sender's PID; each such signal must have its
  ``delivered`` line in the audit log (same PID, creation time, signal and
  sender), and a witness that SIGTERM does not end and that died must have
  its SIGKILL there. The run's audit log is ``RUNDIR/audit/audit.jsonl``.

With ``--chaos``, each cycle draws one fault from ``bench/chaos.py``'s
table (each fault once per round of the table, in an order ``--seed``
shuffles; ``--faults`` narrows the table) (the broker, a private ``redis-server``, killed
during savepid, drain or requeue; supervisord SIGKILLed mid-stop; the tool
SIGKILLed mid-kill and run again; the listener SIGKILLed mid-reap; the
state folder full; the clock stepped; a child that ignores SIGTERM; a
task's children escaping the tree and the process group by each route of
``docs/escapes.md``, before savepid, drawn only where cgroup v2 tracking
works) and restarts the worker through it; the counts are the same.

Every count must be 0: the exit status is 1 otherwise, 2 when a cycle could
not be carried out (a command failed, a worker never answered). Times are
per mode: the restart (the command, up to the new worker answering and the
old tree reaped) and the whole cycle.

The broker is Redis db 14 (``redis://127.0.0.1:6379/14``), flushed once at
the start and never touched elsewhere, with queue and node names of this
run's own; ``--broker filesystem`` uses the guarded filesystem transport
in the run's folder instead. Everything started carries
``CELERY_SUPERVISE_TEST_RUN`` in its environment; at the end supervisord is
shut down, what the soak spared and watched is killed by PID, and a final
sweep kills, by PID, anything else still carrying the mark.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the harness lives with the tests

import psutil  # noqa: E402

from realprocs import RUN_ENV_VAR, WaitTimeout, is_gone, marked_processes, reap, reap_leaks, wait_for, wait_gone  # noqa: E402
from realsupervisor import BIN, PROGRAM, DemoClient, Supervisord, SupervisordFailed, copy_project, listener_section  # noqa: E402
from taskfamily import ATTACHED, DETACHED, Family  # noqa: E402
from privateredis import PrivateRedis  # noqa: E402

from celery_supervise.processes import cgroups  # noqa: E402

from bench import chaos  # noqa: E402
from bench.clocklock import DEFAULT_PATH as CLOCK_LOCK, ClockLock  # noqa: E402

#: The soak's own Redis database: flushed at the start, nothing else is touched.
REDIS_URL = "redis://127.0.0.1:6379/14"
MODES = ("deploy", "restart", "supervisorctl", "kill-9")
COUNTS = ("attached_leaked", "detached_killed", "tasks_lost", "innocents_killed", "audit_missing")
LISTENER = "celery-supervise"
BYSTANDER = "bystander"
#: As conf/supervisord.conf: the listener's --grace.
LISTENER_GRACE = 10
#: The leftovers' grace for deploy.sh (-g) and restart (--grace).
KILL_GRACE = 5

#: How long the old tree may take to be gone once a cycle has settled.
LEAK_TIMEOUT = 15.0
#: How long a task may take to finish once a cycle has settled.
TASK_TIMEOUT = 60.0
#: kombu's Redis visibility_timeout (the demo sets none): an unacked message comes back after this long.
VISIBILITY_TIMEOUT = 3600.0
#: How often the task wait asks whether the tasks not done can still finish (it asks the broker and the worker).
HELD_LOOK_EVERY = 2.0
#: How long a restart may take, the new worker answering included.
SETTLE_TIMEOUT = 90.0
#: A watched process that dies this close to its lifetime's end died of old age.
LIFETIME_SLACK = 5.0
#: A detached child is killed by the soak once this many cycle ends found it alive.
RETIRE_AFTER = 2

BYSTANDER_SECTION = """
[program:{bystander}]
; not a Celery worker: nothing of celery-supervise may ever touch it
command=sleep {lifetime}
autostart=true
autorestart=true
startsecs=0
priority=300
stdout_logfile=NONE
"""


class CycleFailed(Exception):
    """A cycle could not be carried out: a command failed, or something never happened."""


@dataclass
class Config:
    cycles: int = 200
    broker: str = "redis"
    seed: int = 1
    #: Every task child and bystander runs ``sleep LIFETIME``.
    lifetime: int = 600
    #: Range of the tasks' hold times (they are running at the restart).
    hold: tuple[float, float] = (1.0, 4.0)
    short_marks: int = 2
    modes: tuple[str, ...] = MODES
    #: Keep the run's folder (logs, state files, markers) instead of removing it.
    keep: bool = False
    #: Draw one fault per cycle from bench/chaos.py (a private redis-server is the broker).
    chaos: bool = False
    #: The faults to draw from (default: every one bench/chaos.py has, and this user may cause).
    faults: tuple[str, ...] = ()
    #: The broker of a plain soak (a chaos soak runs a redis-server of its own).
    redis_url: str = REDIS_URL
    #: Start no cycle after this many minutes (the tables give the cycles actually run).
    minutes: float | None = None
    #: Held shared for each cycle, exclusive for a clock step: soaks beside each other (bench/clocklock.py).
    clock_lock: str = str(CLOCK_LOCK)


@dataclass
class Watched:
    """A process that must outlive the cycle: a detached task child or a bystander."""

    proc: psutil.Process
    what: str
    lifetime: float
    checks: int = 0

    def died_early(self) -> bool:
        """Gone (by PID + creation time) before its own ``sleep`` could have ended."""
        if not is_gone(self.proc):
            return False
        try:
            born = self.proc.create_time()
        except psutil.Error:  # pragma: no cover - psutil keeps it from the first lookup
            born = 0.0
        return time.time() < born + self.lifetime - LIFETIME_SLACK


@dataclass
class CycleResult:
    number: int
    mode: str
    restart_seconds: float
    cycle_seconds: float
    attached_leaked: list[str] = field(default_factory=list)
    detached_killed: list[str] = field(default_factory=list)
    tasks_lost: list[str] = field(default_factory=list)
    innocents_killed: list[str] = field(default_factory=list)
    audit_missing: list[str] = field(default_factory=list)
    #: Not done, but held in the broker's unacked set (a worker had it prefetched when the broker
    #: died): Redis delivers it again after visibility_timeout. Shown, not counted as lost.
    delayed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sent: int = 0
    requeued: int = 0
    ran_twice: int = 0


@dataclass
class SoakResult:
    config: Config
    cycles: list[CycleResult] = field(default_factory=list)
    error: str | None = None
    final_leftovers: str | None = None
    listener_problems: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: sum(len(getattr(c, name)) for c in self.cycles)
                for name in COUNTS}

    def exit_code(self) -> int:
        if self.error is not None:
            return 2
        return 1 if any(self.counts().values()) else 0

    def times(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{mode: {"restart"|"cycle": {"n", "median", "min", "max"}}}``."""
        return times_of([(c.mode, c.restart_seconds, c.cycle_seconds) for c in self.cycles])

    def document(self) -> dict:
        return {"cycles": len(self.cycles), "broker": self.config.broker, "seed": self.config.seed,
                "counts": self.counts(), "exit_code": self.exit_code(), "error": self.error,
                "sent": sum(c.sent for c in self.cycles), "requeued": sum(c.requeued for c in self.cycles),
                "ran_twice": sum(c.ran_twice for c in self.cycles), "times": self.times(),
                "delayed": sum(len(c.delayed) for c in self.cycles),
                "final_leftovers": self.final_leftovers, "listener_problems": self.listener_problems,
                "chaos": self.config.chaos, "notes": {c.number: c.notes for c in self.cycles if c.notes},
                "details": [c.__dict__ for c in self.cycles if any(getattr(c, k) for k in COUNTS)],
                # Each cycle's times, so that streams' results merge into true medians (bench/streams.py).
                "timings": [[c.mode, round(c.restart_seconds, 3), round(c.cycle_seconds, 3)] for c in self.cycles]}


def times_of(rows) -> dict[str, dict[str, dict[str, float]]]:
    """Per mode, in order of first appearance, from ``(mode, restart seconds, cycle seconds)`` rows."""
    out = {}
    for mode in dict.fromkeys(row[0] for row in rows):
        mine = [row for row in rows if row[0] == mode]
        out[mode] = {}
        for key, column in (("restart", 1), ("cycle", 2)):
            values = [row[column] for row in mine]
            out[mode][key] = {"n": len(values), "median": statistics.median(values),
                              "min": min(values), "max": max(values)}
    return out


# ---------------------------------------------------------------- the soak


class Soak:
    """One supervisord, its worker, and everything the cycles must account for."""

    # For bench/chaos.py's faults, which get the soak and nothing else.
    CycleFailed = CycleFailed
    BIN = BIN
    LISTENER = LISTENER
    KILL_GRACE = KILL_GRACE

    def __init__(self, config: Config, workdir: Path, log=print):
        self.config = config
        self.dir = workdir
        self.log = log
        self.rng = random.Random(config.seed)
        self.fault_rng = random.Random(f"faults-{config.seed}")  # the draw depends on the seed alone
        self.uid = uuid.uuid4().hex[:8]
        self.url = config.redis_url if config.broker == "redis" else None
        self.redis = None
        if config.chaos:  # a broker of our own, to kill and start again
            self.redis = PrivateRedis(workdir / "redis")
            self.url = self.redis.url
        # Every signal the tool sends in this run (CLI, deploy, restart, the listener) goes here.
        self.audit_path = workdir / "audit" / "audit.jsonl"
        os.environ["CELERY_SUPERVISE_AUDIT_LOG"] = str(self.audit_path)
        self.fault: str | None = None
        self.deck: list[str] = []
        self.fault_notes: list[str] = []
        self.cycle_program: Watched | None = None
        self._full: Path | None = None
        self.witnesses: list[dict] = []  # spawn_witnesses markers of the current worker
        self.queue = f"soak-{self.uid}" if self.url else None
        self.project = copy_project(workdir / "project")
        (workdir / "sup").mkdir()
        extra = (listener_section(BIN / "celery-supervise", LISTENER_GRACE, self.project, name=LISTENER,
                                  stopsignal="TERM")
                 + BYSTANDER_SECTION.format(bystander=BYSTANDER, lifetime=config.lifetime))
        self.run = Supervisord(
            workdir / "sup", concurrency=3, stopsignal="TERM", stopwaitsecs=30, project_dir=self.project,
            broker_url=self.url, queues=self.queue, node_prefix=f"soak{self.uid}-", priority=200, extra=extra,
            # A reaper lock of our own: other sessions on this host may be reaping.
            env={"CELERY_SUPERVISE_LOCK": str(workdir / "reaper.lock")},
            # deploy.sh starts supervisord again with `supervisord -c`: it must daemonize.
            nodaemon=False,
        )
        self.run.extra_logs.append("listener.log")
        [self.node] = self.run.node_names()
        self.states = workdir / "states"
        self.states.mkdir(mode=0o700)
        self.watched: list[Watched] = []  # detached task children, until retired
        self.families: list[Family] = []  # of the current worker, not yet restarted
        #: Attached spawn_escapes children of the current worker (out of its tree and group).
        self.escaped: list[psutil.Process] = []
        self.sent: dict[str, str] = {}  # task id -> name, of the current cycle
        #: What the cycle under way started or orphaned: killed by PID at close if it fails.
        self.pending: list[psutil.Process] = []
        #: The kernel's boot time as psutil reads it (/proc/stat btime): a
        #: wall-clock step moves it, and state files carry it.
        self.btime = psutil.boot_time()
        self.clock_lock = ClockLock(config.clock_lock)

    # -- supervisord and the worker

    def supervisord_pid(self) -> int:
        return self.run.proxy().supervisor.getPID()

    def process_pid(self, group: str) -> int | None:
        for info in self.run.proxy().supervisor.getAllProcessInfo():
            if info["group"] == group and info["statename"] == "RUNNING" and info["pid"]:
                return info["pid"]
        return None

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
        elif self.url:
            import redis

            client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
            try:
                client.flushdb()  # db 14 only, and only here
            finally:
                client.close()
        self.run.start()
        self.wait_worker()

    def wait_worker(self, timeout: float = SETTLE_TIMEOUT) -> psutil.Process:
        """Wait until supervisord runs the worker and its node answers a ping; return its main."""

        def answering():
            pid = self.process_pid(PROGRAM)
            if pid is None and self.redis is not None and self.worker_died():
                # kombu can crash the worker on the broker's loss (exit 1, an AttributeError in
                # restore_unacked); supervisord's autorestart would start it, the soak does.
                self.fault_notes.append("the worker exited on the broker's loss; started again")
                self.run.ctl("start", f"{PROGRAM}:*", timeout=120)
                return None
            try:
                replies = self.run.celery.app.control.ping(destination=[self.node], limit=1, timeout=0.5) if pid else []
            except Exception:  # noqa: BLE001 - the broker was killed (chaos): its pooled connections are dead
                if self.redis is None:
                    raise
                self.fresh_client()
                return None
            return pid if any(self.node in r for r in replies or ()) else None

        try:
            return psutil.Process(wait_for(answering, timeout, f"{PROGRAM} ({self.node}) to answer a ping",
                                           interval=0.1))
        except WaitTimeout as exc:
            raise CycleFailed(f"{exc}\n{self.run.diagnostics()}") from None

    def cli(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "celery-supervise"), "-A", "demo", *args], cwd=self.project,
                              env=self.run.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def listener_entries(self) -> list[dict]:
        path = self.run.dir / "listener.log"
        out = []
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"action": "not-json", "line": line[:300]})
        return out

    def wait_reaped(self, main_pid: int, timeout: float = SETTLE_TIMEOUT) -> dict:
        """Wait for the listener's ``reaped`` line of the record of worker *main_pid*."""
        record = f"{PROGRAM}_{PROGRAM}_0@{main_pid}.json"

        def reaped():
            return next((e for e in self.listener_entries()
                         if e.get("action") == "reaped" and e.get("record") == record), None)

        try:
            return wait_for(reaped, timeout, f"the listener to reap {record}", interval=0.1)
        except WaitTimeout as exc:
            raise CycleFailed(f"{exc}\n{self.run.diagnostics()}") from None

    # -- tasks

    def send_tasks(self) -> list[Family]:
        """Two ``spawn_family`` and one long ``mark`` running, short ``mark``s queued; the families."""
        client, lo_hi = self.run.celery, self.config.hold
        self.sent = {}
        client.marker_dir.mkdir(exist_ok=True)
        family_ids = [client.spawn_family(hold=self.rng.uniform(*lo_hi), lifetime=self.config.lifetime,
                                          queue=self.queue) for _ in range(2)]
        long_mark = client.mark(hold=self.rng.uniform(*lo_hi), queue=self.queue)
        witness_id = client.app.send_task(
            "demo.tasks.spawn_witnesses", queue=self.queue,
            kwargs={"marker_dir": str(client.marker_dir), "hold": self.rng.uniform(*lo_hi),
                    "lifetime": self.config.lifetime, "stay": self.fault in chaos.NEEDS_STUBBORN}).id
        self.sent[witness_id] = "spawn_witnesses"
        shorts = [client.mark(hold=0, queue=self.queue) for _ in range(self.config.short_marks)]
        self.sent.update({t: "spawn_family" for t in family_ids})
        self.sent.update({t: "mark" for t in [long_mark, *shorts]})
        families = []
        for task_id in family_ids:
            marker = client.wait_for_marker(task_id, timeout=30)
            families.append(self.adopt(marker))
        client.wait_for_mark(long_mark, "started", timeout=30)
        self.witnesses.append(self.adopt_witnesses(client.wait_for_marker(witness_id, timeout=30)))
        return families

    def adopt_witnesses(self, marker: dict) -> dict:
        procs = {}
        for role, pid in marker["children"].items():
            try:
                procs[role] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                raise CycleFailed(f"witness {role} {pid} of task {marker['task_id']} died before it was seen")
        return {"marker": marker, "procs": procs}

    def audit_missing(self, witnesses: list[dict], gone: set[int]) -> list[str]:
        """Signals a witness received (and a stubborn witness's death) that the audit log does not hold.

        A signal is held by its ``delivered`` outcome line, or, when its
        sender died between the signal and the outcome line (the tool or the
        listener SIGKILLed mid-kill), by its intent line alone: written and
        fsynced before the signal, with no outcome line in its run. The
        reader shows such a row as "no outcome"; the cycle's notes name it.
        """
        lines = chaos.audit_lines(self)
        settled = {(x["run"], x["process"]["pid"], x["signal"]) for x in lines if x.get("phase") == "outcome"}
        delivered, intent_only = set(), set()
        for line in lines:
            proc = line.get("process") or {}
            key = (proc.get("pid"), line.get("signal"), line.get("by"))
            if line.get("phase") == "outcome" and line.get("outcome") == "delivered":
                delivered.add(key)
            elif line.get("phase") == "intent" and (line["run"], key[0], key[1]) not in settled:
                intent_only.add(key)
        missing = []
        for w in witnesses:
            for role, proc in w["procs"].items():
                try:
                    received = (Path(w["marker"]["folders"][role]) / "signals").read_text().split("\n")
                except FileNotFoundError:
                    received = []
                for line in filter(None, received):
                    name, sender = line.split()
                    key = (proc.pid, name, int(sender))  # the PID with the sender: creation times are read two ways
                    if key in delivered:
                        continue
                    if key in intent_only:
                        self.fault_notes.append(f"{name} from {sender} to {role} {proc.pid} is logged as an intent "
                                                "without outcome (its sender died before the outcome line)")
                        continue
                    missing.append(f"{name} from {sender} to {role} {proc.pid}")
                if role == "stubborn" and proc.pid in gone and not any(
                        d[:2] == (proc.pid, "SIGKILL") for d in delivered | intent_only):
                    missing.append(f"SIGKILL to {role} {proc.pid}: it died, and no SIGKILL of ours is logged")
        return missing

    def worker_died(self) -> bool:
        return any(i["group"] == PROGRAM and i["statename"] in ("EXITED", "FATAL", "BACKOFF")
                   for i in self.run.proxy().supervisor.getAllProcessInfo())

    def held_by_the_broker(self, task_ids: list[str]) -> set[str]:
        """Those of *task_ids* whose message sits in Redis' unacked set (delivered again after visibility_timeout)."""
        if not self.url or not task_ids:
            return set()
        import redis

        client = self.redis.client() if self.redis is not None else redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            raw = b"".join(client.hvals("unacked"))
        except Exception:  # noqa: BLE001 - the broker is down: nothing can be shown held
            return set()
        finally:
            client.close()
        return {t for t in task_ids if t.encode() in raw}

    def none_can_finish(self, unfinished: list[str], old_tree: list[psutil.Process], until: float) -> bool:
        """True when every task of *unfinished* is held by the broker where nothing can run it before *until*.

        Then waiting out TASK_TIMEOUT (a broker-down cycle took 72 s) proves
        nothing more: what counts as lost is unchanged, only found sooner.
        Each task must be, all at once (any doubt, a broker or worker that
        does not answer included, means: go on waiting):

        * in Redis' unacked set, each of its entries delivered (kombu's
          ``unacked_index`` time) before the running redis-server started:
          the channel that took it died with the old one, and a delivery tag
          is its channel's alone (Celery drops the reserved requests of a
          lost connection), so nobody can run or ack that message now; only
          ``restore_visible`` brings it back, ``visibility_timeout`` after
          its delivery, which must fall after *until*. No unacked entry can
          leave before then, so the end-of-cycle count is what the full wait
          would give;
        * in no list of the broker (no other copy queued, e.g. one requeue sent);
        * run or reserved by no worker: the cycle's old tree is gone (one of
          its pool processes could still be running it, its ack lost with the
          broker), no other worker of this run is alive, and the current one
          answers ``inspect`` without it.
        """
        if self.redis is None:
            return False  # the plain soak's broker never dies under it: tasks get the full wait
        if not all(is_gone(p) for p in old_tree):
            return False
        client = self.redis.client()
        try:
            info = client.info("server")
            # The earliest the running server can have started: uptime counts whole seconds.
            started = info["server_time_usec"] / 1e6 - info["uptime_in_seconds"] - 1
            unacked = client.hgetall("unacked")
            delivered = dict(client.zrange("unacked_index", 0, -1, withscores=True))
            queued = b"".join(item for key in client.scan_iter() if client.type(key) == b"list"
                              for item in client.lrange(key, 0, -1))
        except Exception:  # noqa: BLE001 - the broker does not answer: nothing is proven
            return False
        finally:
            client.close()
        back_at = time.time() + (until - time.monotonic())  # the end of the wait, on the clock kombu writes
        for task_id in unfinished:
            key = task_id.encode()
            tags = [tag for tag, raw in unacked.items() if key in raw]
            if not tags or key in queued:
                return False
            for tag in tags:
                when = delivered.get(tag)
                if when is None or when >= started or when + VISIBILITY_TIMEOUT <= back_at:
                    return False
        current = self.process_pid(PROGRAM)
        if current is None:
            return False
        try:
            tree = {current, *(p.pid for p in psutil.Process(current).children(recursive=True))}
        except psutil.Error:
            return False
        if any(p.pid not in tree for p in marked_processes(os.environ[RUN_ENV_VAR], exclude={os.getpid()})
               if _is_worker(p)):
            return False
        try:
            inspect = self.run.celery.app.control.inspect(destination=[self.node], timeout=1.0)
            active, reserved = inspect.active() or {}, inspect.reserved() or {}
        except Exception:  # noqa: BLE001 - the soak's client lost its broker: nothing is proven
            return False
        if self.node not in active or self.node not in reserved:
            return False
        held = {r.get("id") for r in active[self.node] + reserved[self.node]}
        if held & set(unfinished):
            return False
        self.fault_notes.append(f"stopped waiting for {len(unfinished)} task(s) {TASK_TIMEOUT - (until - time.monotonic()):.0f} s"
                                " into the wait: each is held by the broker, delivered to a channel that died with"
                                " it, and cannot come back before visibility_timeout")
        return True

    def fresh_client(self) -> None:
        """A new Celery client: the old one's connections (and reply queue) died with the broker."""
        old = self.run.celery
        self.run.celery = DemoClient(self.run.broker_dir, old.marker_dir, broker_url=self.url)
        try:
            old.close()
        except Exception:  # noqa: BLE001 - closing what a dead broker left
            pass

    def missed(self, why: str) -> None:
        """A fault's handshake never came: the cycle went on without the fault; said, never hidden."""
        self.fault_notes.append(f"FAULT MISSED: {why}")

    def program_innocents(self) -> list[Watched]:
        if self.cycle_program is None:
            return []
        self.pending.append(self.cycle_program.proc)
        return [self.cycle_program]

    def restart_only(self, mode: str, number: int, state: Path) -> None:
        """``celery-supervise restart --state STATE``, without the requeue (a fault comes first)."""
        result = self.cli("restart", PROGRAM, "-c", str(self.run.conf_path), "--grace", str(KILL_GRACE),
                          "--state", str(state), "--json", timeout=300)
        if result.returncode != 0:
            raise CycleFailed(f"restart exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        self.wait_worker()

    def full_dir(self) -> Path:
        """A tiny tmpfs of the run's own (root only), for the "state folder full" fault."""
        if self._full is None:
            path = self.dir / "full"
            path.mkdir(mode=0o700)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={chaos.FULL_SIZE},mode=0700", "tmpfs", str(path)],
                           check=True, stdin=subprocess.DEVNULL, capture_output=True)
            self._full = path
        return self._full

    def adopt(self, marker: dict) -> Family:
        """Track a family's children: the detached ones are watched from now on."""
        procs = {}
        for role, pid in marker["children"].items():
            try:
                procs[role] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                raise CycleFailed(f"a child of task {marker['task_id']} died before it was seen: {role} {pid}")
        family = Family(marker, procs)
        for role in DETACHED:
            self.watched.append(Watched(procs[role], f"{role} {procs[role].pid} of task {family.task_id}",
                                        self.config.lifetime))
        return family

    def spawn_escapes(self, route: str) -> dict:
        """Run ``spawn_escapes`` by *route* on the worker, wait until it has finished; its marker.

        Its children are tracked from here on (:meth:`adopt_escapes`). The
        task is over before the caller restarts anything, so that no record
        names it as running (a requeued one is adopted again by the cycle).
        """
        client = self.run.celery
        task_id = client.app.send_task("demo.tasks.spawn_escapes", queue=self.queue, kwargs={
            "marker_dir": str(client.marker_dir), "route": route, "lifetime": self.config.lifetime}).id
        self.sent[task_id] = "spawn_escapes"
        marker = client.wait_for_marker(task_id, timeout=chaos.HANDSHAKE)
        self.adopt_escapes(marker)
        wait_for(lambda: self.done(task_id), chaos.HANDSHAKE, f"spawn_escapes {task_id} to finish")
        return marker

    def adopt_escapes(self, marker: dict) -> dict[str, psutil.Process]:
        """Track ``spawn_escapes``'s children: the attached one must die with the worker, the others live."""
        procs = {}
        for variant, pid in marker["children"].items():
            try:
                procs[variant] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                raise CycleFailed(f"escaped {variant} {pid} of task {marker['task_id']} died before it was seen")
        self.escaped.append(procs["attached"])
        for variant in ("setsid", "nohup"):
            self.watched.append(Watched(procs[variant], f"escaped ({marker['route']}) {variant} {procs[variant].pid} "
                                        f"of task {marker['task_id']}", self.config.lifetime))
        return procs

    def done(self, task_id: str) -> bool:
        return (self.run.marker_dir / f"{task_id}.done").exists()

    def runs(self, task_id: str) -> int:
        try:
            return len((self.run.marker_dir / f"{task_id}.runs").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def requeue(self, state: Path) -> list[str]:
        """``celery-supervise requeue STATE``; the ids it sent again."""
        if not state.exists():
            raise CycleFailed(f"no state file {state} to requeue from")
        result = self.cli("requeue", str(state), "--json")
        if result.returncode != 0:
            raise CycleFailed(f"requeue exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return [t["id"] for t in json.loads(result.stdout)["tasks"] if t["status"] == "re-sent"]

    # -- bystanders

    def bystanders(self) -> list[tuple[Watched, psutil.Popen]]:
        """A ``sleep`` child of the soak and a ``setsid``'d one, both of the same user."""
        out = []
        for what, new_session in (("sleep child of the soak", False), ("setsid'd sleep", True)):
            proc = psutil.Popen(["sleep", str(self.config.lifetime)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=new_session)
            out.append((Watched(proc, f"{what} {proc.pid}", self.config.lifetime), proc))
            self.pending.append(proc)
        return out

    def bystander_program(self) -> Watched | None:
        pid = self.process_pid(BYSTANDER)
        if pid is None:
            return None
        return Watched(psutil.Process(pid), f"supervisord program {BYSTANDER} ({pid})", self.config.lifetime)

    # -- the four ways to restart

    def restart(self, mode: str, number: int) -> tuple[list[str], list[Watched]]:
        """Restart the worker one way; wait until the new one answers and the old tree is dealt with.

        Returns the task ids ``requeue`` sent again and the innocents that
        must still be alive after the restart.
        """
        old_main = psutil.Process(self.process_pid(PROGRAM))
        state = self.states / f"cycle{number}.json"
        program = self.bystander_program()
        innocents = []
        if mode == "deploy":
            # supervisorctl shutdown stops the bystander program too: rightly.
            env = dict(self.run.env, PATH=f"{BIN}{os.pathsep}{self.run.env['PATH']}")
            result = subprocess.run(
                ["bash", str(REPO / "scripts" / "deploy.sh"), "-c", str(self.run.conf_path), "-A", "demo",
                 "-s", str(state), "-g", str(KILL_GRACE)],
                cwd=self.project, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
            self._collect_old_supervisord()
            if result.returncode != 0:
                raise CycleFailed(f"deploy.sh exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
            self.wait_worker()
            return self.requeue(state), innocents
        if program is not None:
            innocents.append(program)
            self.pending.append(program.proc)
        if mode == "restart":
            result = self.cli("restart", PROGRAM, "-c", str(self.run.conf_path), "--grace", str(KILL_GRACE),
                              "--state", str(state), "--json", timeout=300)
            if result.returncode != 0:
                raise CycleFailed(f"restart exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
            self.wait_worker()
            return self.requeue(state), innocents
        if mode == "supervisorctl":
            result = self.run.ctl("restart", f"{PROGRAM}:*", timeout=120)
            if result.returncode != 0:
                raise CycleFailed(f"supervisorctl restart exited {result.returncode}:\n{result.stdout}{result.stderr}")
            self.wait_reaped(old_main.pid)
            self.wait_worker()
            return [], innocents
        if mode == "kill-9":
            sup = psutil.Process(self.supervisord_pid())
            listener = self.process_pid(LISTENER)
            listener = psutil.Process(listener) if listener else None
            os.kill(sup.pid, signal.SIGKILL)
            self._collect_old_supervisord()
            # The old listener reads end of input and leaves, touching nothing.
            if wait_gone([p for p in (sup, listener) if p is not None], 15):
                raise CycleFailed(f"supervisord {sup.pid} or its listener outlived SIGKILL + 15 s")
            # What an operator who wants the cut-off tasks back records first.
            saved = self.cli("savepid", str(state), "--json")
            if saved.returncode != 0:
                raise CycleFailed(f"savepid of the orphan exited {saved.returncode}:\n{saved.stderr}")
            try:
                self.run.start()
            except (SupervisordFailed, WaitTimeout) as exc:
                raise CycleFailed(str(exc)) from None
            self.wait_reaped(old_main.pid)
            self.wait_worker()
            return self.requeue(state), innocents
        raise ValueError(f"unknown mode {mode!r}")

    def _collect_old_supervisord(self) -> None:
        """Collect our `supervisord -n` child once it has exited (a daemon is init's to collect)."""
        proc = self.run.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass  # not exited: for deploy.sh, it said so already

    # -- one cycle

    def cycle(self, number: int, mode: str) -> CycleResult:
        started = time.monotonic()
        self.fault_notes = []
        if self.config.chaos:
            if not self.deck:  # each fault once per round, in an order the seed shuffles
                self.deck = sorted(self.faults())
                self.fault_rng.shuffle(self.deck)
            self.fault = self.deck.pop()
        main = psutil.Process(self.process_pid(PROGRAM))
        pools = main.children()
        soak_bystanders = self.bystanders()
        self.families.extend(self.send_tasks())
        families, self.families = self.families, []
        witnesses, self.witnesses = self.witnesses, []

        restart_started = time.monotonic()
        if self.fault is not None:
            self.cycle_program = self.bystander_program()
            requeued, innocents = chaos.FAULTS[self.fault](self, number, self.states / f"cycle{number}.json")
            mode = self.fault
        else:
            requeued, innocents = self.restart(mode, number)
        restart_seconds = time.monotonic() - restart_started
        escaped, self.escaped = self.escaped, []  # a fault starts them during the cycle
        result = CycleResult(number, mode, restart_seconds, 0.0, sent=len(self.sent), requeued=len(requeued),
                             notes=list(self.fault_notes))

        # Lost: never finished, even after requeue sent it again.
        waiting = set(self.sent)
        until = time.monotonic() + TASK_TIMEOUT
        old_tree = [main, *pools]
        look = [0.0]

        def settled():
            unfinished = [t for t in waiting if not self.done(t)]
            if not unfinished:
                return True
            if time.monotonic() < look[0]:
                return False
            look[0] = time.monotonic() + HELD_LOOK_EVERY
            return self.none_can_finish(unfinished, old_tree, until)

        try:
            wait_for(settled, TASK_TIMEOUT, "every task to finish", interval=0.1)
        except WaitTimeout:
            pass
        unfinished = [t for t in sorted(waiting) if not self.done(t)]
        held = self.held_by_the_broker(unfinished)
        result.tasks_lost = [f"{self.sent[t]} {t}" for t in unfinished if t not in held]
        result.delayed = [f"{self.sent[t]} {t}" for t in unfinished if t in held]
        result.ran_twice = sum(1 for t, name in self.sent.items() if name == "mark" and self.runs(t) > 1)
        # A spawn_family sent again ran on the new worker: its children are
        # the new worker's, to be handled by the next cycle.
        for task_id in requeued:
            if self.sent.get(task_id) == "spawn_family" and self.done(task_id):
                marker = json.loads((self.run.marker_dir / f"{task_id}.json").read_text())
                if marker["pool_pid"] not in {f.pool_pid for f in families}:
                    self.families.append(self.adopt(marker))
            if self.sent.get(task_id) == "spawn_witnesses" and self.done(task_id):
                marker = json.loads((self.run.marker_dir / f"{task_id}.json").read_text())
                if marker["pool_pid"] not in {w["marker"]["pool_pid"] for w in witnesses}:
                    self.witnesses.append(self.adopt_witnesses(marker))
            if self.sent.get(task_id) == "spawn_escapes" and self.done(task_id):
                marker = json.loads((self.run.marker_dir / f"{task_id}.json").read_text())
                if marker["worker"] != main.pid:
                    self.adopt_escapes(marker)

        # Attached: the old tree and its tasks' attached children are gone.
        should_die = [main, *pools, *(f.procs[r] for f in families for r in ATTACHED), *escaped,
                      *(p for w in witnesses for p in w["procs"].values())]
        left = wait_gone(should_die, LEAK_TIMEOUT)
        result.attached_leaked = [_describe(p) for p in left]
        # Before the soak's own reap, whose signals are not the tool's.
        result.audit_missing = self.audit_missing(witnesses, {p.pid for p in should_die} - {p.pid for p in left})
        result.notes = list(self.fault_notes)
        reap(left)
        # Anything else carrying the mark, outside the current supervisord and the watched ones.
        result.attached_leaked += [_describe(p) for p in self.strays(innocents, soak_bystanders)]

        # Detached and innocents: alive unless their lifetime is over.
        for w in self.watched:
            w.checks += 1
        result.detached_killed = [w.what for w in self.watched if w.died_early()]
        self.watched = [w for w in self.watched if not is_gone(w.proc)]
        everyone = innocents + [w for w, _ in soak_bystanders]
        result.innocents_killed = [w.what for w in everyone if w.died_early()]
        # The bystander program the current supervisord runs goes on; an
        # orphaned one (kill-9) and the soak's own are the soak's to kill.
        current = self.supervisord_pid()
        self.retire([w.proc for w in everyone if not is_gone(w.proc) and _ppid(w.proc) != current])
        for _, popen in soak_bystanders:
            popen.wait()
        retired = [w for w in self.watched if w.checks >= RETIRE_AFTER]
        self.watched = [w for w in self.watched if w.checks < RETIRE_AFTER]
        self.retire([w.proc for w in retired])
        self.pending = []
        result.cycle_seconds = time.monotonic() - started
        btime = psutil.boot_time()
        if btime != self.btime:
            self.log(f"soak: the kernel's boot time moved by {btime - self.btime:+.0f} s (a wall-clock step)")
            self.btime = btime
        return result

    def faults(self) -> list[str]:
        names = set(self.config.faults or chaos.FAULTS)
        if os.geteuid() != 0:  # mounting a tiny filesystem and setting the clock need root
            names -= {"state-folder-full", "clock-stepped"}
        if cgroups.unavailable() is not None:  # escaped children are found by the worker's cgroup alone
            names -= chaos.NEEDS_CGROUPS
        return sorted(names)

    def strays(self, innocents: list[Watched], bystanders) -> list[psutil.Process]:
        """Live marked processes that nobody accounts for; killed by PID."""
        keep = {os.getpid()}
        try:
            sup = psutil.Process(self.supervisord_pid())
            keep.add(sup.pid)
            keep.update(p.pid for p in sup.children(recursive=True))
        except (OSError, psutil.Error):
            pass
        keep.update(w.proc.pid for w in self.watched)
        keep.update(w.proc.pid for w in innocents)
        keep.update(w.proc.pid for w, _ in bystanders)
        found = [p for p in marked_processes(os.environ[RUN_ENV_VAR], exclude=keep)]
        reap(found)
        return found

    def retire(self, procs: list[psutil.Process]) -> None:
        """Kill processes the soak is done with, by PID, the youngest (grandchildren) first."""
        def born(p):
            try:
                return p.create_time()
            except psutil.Error:
                return 0.0

        reap(sorted(procs, key=born, reverse=True))

    def close(self) -> str | None:
        """Shut supervisord down; kill what the soak watched; sweep the mark. Describes what the sweep found."""
        try:
            with self.clock_lock.shared():  # supervisord times its stopwaitsecs by the wall clock
                self.run.stop()
        finally:
            self.clock_lock.close()
            if self.redis is not None:
                self.redis.stop()
            if self._full is not None:
                subprocess.run(["umount", str(self._full)], stdin=subprocess.DEVNULL, capture_output=True)
            # The in-flight cycle's bystanders: the program's is supervisord's own,
            # unless it was orphaned; both are gone or killed by PID here.
            self.retire([w.proc for w in self.watched] + self.pending)
            self.watched, self.pending = [], []
        return reap_leaks(os.environ[RUN_ENV_VAR], exclude={os.getpid()})


def _is_worker(proc: psutil.Process) -> bool:
    """A Celery worker process (main or pool) of the demo: ``celery -A demo worker ...``."""
    try:
        return "worker" in proc.cmdline()
    except psutil.Error:
        return False


def _ppid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def run(config: Config, log=print) -> SoakResult:
    """Run the soak; every process it started is gone when it returns."""
    os.environ.setdefault(RUN_ENV_VAR, "soak-" + uuid.uuid4().hex)
    os.environ.pop("CELERY_BROKER_URL", None)
    result = SoakResult(config)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    soak = None
    try:
        soak = Soak(config, workdir, log=log)
        began = time.monotonic()  # --minutes is a budget from the start, as for streams started together
        with soak.clock_lock.shared():
            soak.start()
        for number in range(1, config.cycles + 1):
            if config.minutes is not None and time.monotonic() - began > config.minutes * 60:
                log(f"soak: --minutes {config.minutes:g} spent: stopping after {number - 1} cycle(s)")
                break
            mode = config.modes[(number - 1) % len(config.modes)]
            # Shared for the whole cycle: no other soak steps the clock while this one's supervisord
            # may be timing a stop (a clock-stepped cycle of ours takes it exclusive for its step alone).
            with soak.clock_lock.shared():
                cycle = soak.cycle(number, mode)
            result.cycles.append(cycle)
            bad = {k: getattr(cycle, k) for k in COUNTS if getattr(cycle, k)}
            mode = cycle.mode
            log(f"cycle {number:3d} {mode:13s} restart {cycle.restart_seconds:5.2f}s cycle {cycle.cycle_seconds:5.2f}s"
                f" sent {cycle.sent} requeued {cycle.requeued}" + (f"  PROBLEMS {bad}" if bad else "")
                + (f"  ({'; '.join(cycle.notes)})" if cycle.notes else "")
                + (f"  held by the broker (unacked): {cycle.delayed}" if cycle.delayed else ""))
        result.listener_problems = [e for e in soak.listener_entries()
                                    if e.get("action") in ("error", "refused", "malformed", "not-json")]
    except (CycleFailed, WaitTimeout, SupervisordFailed, subprocess.TimeoutExpired, OSError) as exc:
        result.error = f"cycle {len(result.cycles) + 1}: {type(exc).__name__}: {exc}"
    finally:
        if soak is not None:
            result.final_leftovers = soak.close()
        if config.keep or result.exit_code():
            log(f"soak: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def summary(result: SoakResult | dict) -> str:
    """The tables, of one soak or of a document streams merged (bench/streams.py)."""
    doc = result if isinstance(result, dict) else result.document()
    kind = "chaos soak" if doc["chaos"] else "soak"
    seeds = (f"{len(doc['streams'])} streams ("
             + ", ".join(f"seed {s['seed']}: {s['cycles']} cycle(s)" for s in doc["streams"]) + ")"
             if doc.get("streams") else f"seed {doc['seed']}")
    lines = [f"{kind}: {doc['cycles']} cycle(s) on {doc['broker']}, {seeds}: "
             f"{doc['sent']} task(s) sent, {doc['requeued']} re-sent by requeue, {doc['ran_twice']} ran twice",
             "", "| count | value |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {value} |" for name, value in doc["counts"].items()]
    missed = sum(n.startswith("FAULT MISSED") for notes in doc["notes"].values() for n in notes)
    if doc["chaos"]:
        lines += ["", f"faults whose handshake never came (the cycle ran without its fault): {missed}"]
    if doc["chaos"] or doc["delayed"]:
        lines += [f"tasks not done but held in the broker's unacked set (a worker had them prefetched "
                  f"when it, or its broker, was killed; Redis delivers them again after visibility_timeout): {doc['delayed']}"]
    lines += ["", "| mode | cycles | restart median (min–max) | whole cycle median (min–max) |", "|---|---|---|---|"]
    for mode, t in doc["times"].items():
        r, c = t["restart"], t["cycle"]
        lines.append(f"| {mode} | {r['n']} | {r['median']:.2f} s ({r['min']:.2f}–{r['max']:.2f}) "
                     f"| {c['median']:.2f} s ({c['min']:.2f}–{c['max']:.2f}) |")
    for d in doc["details"]:
        lines.append(("" if d.get("seed") is None else f"seed {d['seed']} ")
                     + f"cycle {d['number']} ({d['mode']}): " + "; ".join(
            f"{k}: {d[k]}" for k in COUNTS if d[k]))
    if doc["listener_problems"]:
        lines.append(f"listener problems: {doc['listener_problems']}")
    if doc["final_leftovers"]:
        lines.append(f"final sweep: {doc['final_leftovers']}")
    if doc["error"]:
        lines.append(f"ERROR: {doc['error']}")
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI time limit, a user's kill, a streams parent passing on its
    # own) ends the run as Ctrl-C does, through every ``finally``: a stepped
    # clock is set right, the tiny filesystem unmounted, the private
    # redis-server and the witnesses stopped. By default it ended the process
    # there and then, and all of them outlived it.
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=None, help="restart cycles (default 200; --quick: 4)")
    parser.add_argument("--quick", action="store_true",
                        help="one cycle per mode, shorter tasks and lifetimes (for CI)")
    parser.add_argument("--broker", choices=("redis", "filesystem"), default="redis",
                        help=f"redis: {REDIS_URL} (flushed at the start); filesystem: a folder of the run's own")
    parser.add_argument("--seed", type=int, default=1, help="seed of the tasks' hold times")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma list of the modes to alternate, in order (default {','.join(MODES)})")
    parser.add_argument("--chaos", action="store_true",
                        help="draw one fault per cycle from bench/chaos.py (the broker is a private redis-server)")
    parser.add_argument("--faults", default="", metavar="LIST",
                        help="--chaos: comma list of the faults to draw from (default: all of bench/chaos.py's)")
    parser.add_argument("--redis-url", default=REDIS_URL, metavar="URL",
                        help=f"the plain soak's Redis database, flushed at the start (default {REDIS_URL})")
    parser.add_argument("--minutes", type=float, default=None, metavar="M",
                        help="start no new cycle after M minutes; the tables count the cycles run")
    parser.add_argument("--streams", type=int, default=1, metavar="K",
                        help="--chaos: run K streams side by side (seeds S, S+1, ...), --cycles split between them, "
                             "one merged table (bench/streams.py)")
    parser.add_argument("--clock-lock", default=str(CLOCK_LOCK), metavar="PATH",
                        help="held shared for each cycle, exclusive for a clock step, by every soak on this machine "
                             f"(default {CLOCK_LOCK}; bench/clocklock.py)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, state files, markers)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: a comma list of {', '.join(MODES)}")
    faults = tuple(f for f in args.faults.split(",") if f)
    if set(faults) - set(chaos.FAULTS):
        parser.error(f"--faults: a comma list of {', '.join(sorted(chaos.FAULTS))}")
    config = Config(broker=args.broker, seed=args.seed, modes=modes, keep=args.keep, chaos=args.chaos,
                    faults=faults, redis_url=args.redis_url, minutes=args.minutes)
    if args.quick:
        config.cycles, config.lifetime, config.hold, config.short_marks = 4, 120, (0.5, 2.0), 1
    if args.cycles is not None:
        if args.cycles < 1:
            parser.error("--cycles must be at least 1")
        config.cycles = args.cycles
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    if args.streams != 1:
        # Plain soaks share Redis db 14, which each flushes at its start: only chaos soaks run side by side.
        if args.streams < 1 or not args.chaos:
            parser.error("--streams K: K >= 1, with --chaos")
        from bench import streams

        doc = streams.run(streams.stream_args(args), config.cycles, args.streams, args.seed, log=log)
        print(json.dumps(doc, default=str) if args.json else summary(doc))
        return doc["exit_code"]
    config.clock_lock = args.clock_lock
    result = run(config, log=log)
    print(json.dumps(result.document(), default=str) if args.json else summary(result))
    return result.exit_code()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"soak: interrupted ({exc or 'Ctrl-C'}): no result; its processes are stopped", file=sys.stderr)
        sys.exit(130)
