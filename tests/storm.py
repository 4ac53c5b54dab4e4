"""An event storm: one supervisord, many small workers, ``supervisorctl restart all``.

Shared by ``tests/test_e2e_storm.py`` and ``bench/storm_bench.py``. One
supervisord (:class:`realsupervisor.Supervisord`) runs *workers* demo
workers (``numprocs``, ``--pool solo``: one process each, so 32 fit two
cores) on a Redis db, each also consuming a queue of its own, and the
listener with a given ``buffer_size``. :meth:`Storm.families` has each
worker run a ``spawn_family`` task that returns at once, leaving below the
worker main (solo pool: the task runs in the main process)::

    celery worker (main, solo)     stopped by supervisord
    ├── sleep / sh → sleep         attached: the listener kills them
    ├── nohup sleep                spared: nohup
    └── sh (setsid) → sleep        spared: own session

``restart all`` stops every worker *and the listener* at once (supervisord
sends every stop in one pass), then starts them all: each worker's four
state changes (STOPPING, STOPPED, STARTING, RUNNING) queue up in the
listener pool's buffer while the listener is busy reaping, stopping or
starting. supervisord drops the oldest event when that buffer is full and
logs :data:`DISCARDED`.
"""

import re
import time
from datetime import datetime

import psutil

from realprocs import wait_for
from realsupervisor import BIN, PROGRAM, Supervisord, listener_section

LISTENER = "celery-supervise"
GRACE = 2
#: What supervisord logs when a listener pool's buffer overflows (supervisor/process.py, _acceptEvent).
DISCARDED = "event buffer overflowed, discarding event"
#: How long the workers may take to answer a first ping: 32 Celery start-ups on two cores.
START_TIMEOUT = 300.0
# A stop is logged INFO, or WARN when stopwaitsecs ran out and supervisord SIGKILLed it.
_STOPPED = re.compile(r"^(\S+ \S+) (?:INFO|WARN) stopped: " + re.escape(PROGRAM) + r"_\d+ ", re.M)
_SENT = re.compile(r" DEBG event (\d+) sent to listener " + re.escape(LISTENER), re.M)


class Storm:
    """The supervisord of one storm, and what the test or bench watches of it."""

    def __init__(self, directory, project, *, workers, buffer_size, redis_url, uid, env=None):
        self.workers = workers
        self.uid = uid
        extra = listener_section(BIN / "celery-supervise", GRACE, project, name=LISTENER, buffer_size=buffer_size,
                                 stdout_logfile="%(here)s/listener.stdout")
        # The queue option carries the pool choice: the harness's command line has no other slot.
        self.run = Supervisord(directory, numprocs=workers, concurrency=1, stopwaitsecs=10, priority=200,
                               extra=extra, project_dir=project, broker_url=redis_url,
                               queues=f"storm-{uid}-%(process_num)d -P solo", node_prefix=f"storm{uid}-", env=env)
        # debug: supervisord then logs every event it hands the listener ("event N sent to listener").
        self.run.conf_path.write_text(self.run.conf_path.read_text().replace("loglevel=info", "loglevel=debug"))
        self.run.extra_logs.append("listener.log")

    def start(self):
        self.run.start()
        self.run.wait_nodes(START_TIMEOUT)
        return self

    def mains(self):
        return {name: psutil.Process(pid) for name, pid in self.run.group_pids(PROGRAM).items()}

    def listener(self):
        return psutil.Process(self.run.group_pids(LISTENER)[LISTENER])

    def families(self, track):
        """One ``spawn_family`` per worker, on its own queue; ``[{role: psutil.Process}]`` once all run."""
        client = self.run.celery
        ids = [client.spawn_family(hold=0, lifetime=150, queue=f"storm-{self.uid}-{n}") for n in range(self.workers)]
        out = []
        for task_id in ids:
            marker = client.wait_for_marker(task_id, timeout=60)
            out.append(dict(zip(marker["children"], track(*marker["children"].values()))))
        return out

    def wait_recorded(self, families, entries):
        """Wait until the listener's last record of every worker holds its main and its family's six children.

        *entries* is the listener's log reader (``Listening.entries``).
        """
        mains = {p.pid for p in self.mains().values()}

        def complete():
            latest = {}
            for e in entries():
                if e["action"] == "recorded" and e["pid"] in mains:
                    latest[e["pid"]] = e["processes"]
            return len(latest) == len(mains) and all(n >= 7 for n in latest.values())

        wait_for(complete, 60, "the listener to record every worker's family", interval=0.2)

    def wait_settled(self, entries, old_pids):
        """Wait until the new workers answer and the listener has recorded every one (their RUNNING events handled)."""
        self.run.wait_nodes(START_TIMEOUT)

        def recorded():
            mains = {p.pid for p in self.mains().values()}
            if mains & set(old_pids):
                return False
            return mains <= {e["pid"] for e in entries() if e["action"] == "recorded"}

        wait_for(recorded, 60, "the listener to record every new worker", interval=0.2)

    def events_sent(self, since=0):
        """Serials of the events supervisord handed the listener (debug log), after the first *since* lines."""
        return [int(s) for s in _SENT.findall(self.run.log())][since:]

    def last_stop(self, after: float) -> float:
        """Wall-clock time of the last "stopped: celery-worker_N" line logged at or after *after*."""
        times = [_parse(t) for t in _STOPPED.findall(self.run.log())]
        times = [t for t in times if t >= after - 0.001]
        if len(times) < self.workers:
            raise AssertionError(f"{len(times)} of {self.workers} workers logged a stop")
        return max(times)

    def discarded(self):
        return [line for line in self.run.log().splitlines() if DISCARDED in line]


def _parse(stamp: str) -> float:
    # supervisord logs local time with milliseconds: "2026-12-03 14:27:22,123".
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def watch_gone(procs, deadline):
    """Poll *procs* every 5 ms until all are gone or *deadline* (monotonic); ``{proc: wall time it was seen gone}``."""
    gone = {}
    while len(gone) < len(procs) and time.monotonic() < deadline:
        for p in procs:
            if p not in gone and not _alive(p):
                gone[p] = time.time()
        time.sleep(0.005)
    return gone


def _alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
