"""``restart --rolling`` against a real supervisord running three workers (``numprocs=3``).

Each worker (``-c 2``) consumes the shared queue ``roll-<uid>`` and one of
its own, ``roll-<uid>-<N>``, so a test can choose where a task runs. Before
the roll each worker runs a ``spawn_family`` task on its own queue::

    celery-worker_N (main)        replaced in batch N+1: drained, stopped by supervisord
    ├── pool                      runs spawn_family (3 s), which leaves:
    │   ├── sleep / sh → sleep    killed     attached
    │   ├── nohup sleep           spared     nohup
    │   └── sh (setsid) → sleep   spared     own session
    └── pool                      takes the probes

A probe (``mark``) goes to the shared queue every 0.1 s through the whole
roll, and a monitor thread reads supervisord's states and ping answers
every round: a process is out of service from the moment supervisord says
it is not RUNNING until its new PID's node has answered a ping.

Redis db 3 is this file's own; each test removes its keys at the start and
the end. The filesystem transport's folder is the test's own.
"""

import json
import socket
import threading
import time
import uuid

import pytest

from brokers import clean_redis, require
from realprocs import wait_for, wait_gone
from realsupervisor import PROGRAM, DemoClient, copy_project
from taskfamily import ATTACHED, DETACHED, Family, alive, celery_supervise

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/3"
NUMPROCS = 3
#: How long each worker's spawn_family task holds: its batch's drain waits for it.
FAMILY_HOLD = 3.0
PROBE_EVERY = 0.1


@pytest.fixture(params=[("filesystem", 1), ("redis", 1), ("redis", 2)],
                ids=["filesystem-one-at-a-time", "redis-one-at-a-time", "redis-two-at-a-time"])
def case(request):
    """``(url or None, uid, N)``; request it before ``supervisor`` so it outlives the workers.

    N = 2 runs on Redis only: the batching is the same on both brokers, and the file stays short.
    """
    uid = uuid.uuid4().hex[:8]
    name, n = request.param
    url = REDIS_URL if name == "redis" else None
    if url:
        require(url)
        clean_redis(url, uid)
    yield url, uid, n
    if url:
        clean_redis(url, uid)


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


def start(supervisor, broker, project):
    url, uid = broker
    q = f"roll-{uid}"
    run = supervisor(numprocs=NUMPROCS, concurrency=2, stopwaitsecs=10, project_dir=project, broker_url=url,
                     queues=f"{q},{q}-%(process_num)d", node_prefix=f"roll{uid}-")
    run.wait_nodes()
    return run, q


def rolling(run, project, *args, timeout=240):
    return celery_supervise("-A", "demo", "restart", PROGRAM, "-c", str(run.conf_path), "--rolling", *args,
                            cwd=project, env=run.env, timeout=timeout)


class Probes(threading.Thread):
    """Sends a ``mark`` probe to *queue* every 0.1 s until stopped; remembers each send time."""

    def __init__(self, run, queue):
        super().__init__(daemon=True)
        self.client = DemoClient(run.broker_dir, run.marker_dir, broker_url=run.env.get("CELERY_BROKER_URL"))
        self.queue = queue
        self.sent = {}  # task id -> wall-clock send time
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(PROBE_EVERY):
            at = time.time()
            self.sent[self.client.mark(queue=self.queue)] = at

    def stop(self):
        self.halt.set()
        self.join(10)
        self.client.close()

    def lost(self, run, timeout=60):
        """The probes with no ``done`` stamp once *timeout* has passed (waiting for them)."""
        def missing():
            return [t for t in self.sent if run.celery.mark_record(t, "done") is None]

        try:
            wait_for(lambda: not missing(), timeout, "every probe to finish", interval=0.2)
        except AssertionError:
            pass
        return missing()

    def longest_pickup(self, run):
        return max(run.celery.mark_record(t, "started")["time"] - at for t, at in self.sent.items())


class Monitor(threading.Thread):
    """Counts the processes out of service, round by round, from supervisord's states and pings."""

    def __init__(self, run, uid):
        super().__init__(daemon=True)
        self.rpc = run.proxy()
        self.client = DemoClient(run.broker_dir, run.marker_dir, broker_url=run.env.get("CELERY_BROKER_URL"))
        self.node = {f"{PROGRAM}_{n}": f"roll{uid}-{n}@" for n in range(NUMPROCS)}
        self.answered = {}  # process name -> the PID whose node has answered a ping
        self.rounds = []  # [(time, {process out of service: its state})]
        self.halt = threading.Event()

    def sample(self):
        infos = {i["name"]: i for i in self.rpc.supervisor.getAllProcessInfo()}
        # Read before the ping: a node that answers it is the process of the PID read here,
        # since an old process is gone before supervisord shows the new PID.
        # Every node is named, so the ping returns as soon as all answer (else after 1 s).
        nodes = [f"{prefix}{socket.gethostname()}" for prefix in self.node.values()]
        replies = [name for reply in self.client.app.control.ping(destination=nodes, limit=len(nodes), timeout=1.0)
                   for name in reply]
        for name, info in infos.items():
            if info["statename"] == "RUNNING" and any(r.startswith(self.node[name]) for r in replies):
                self.answered[name] = info["pid"]
        out = {name: info["statename"] for name, info in infos.items()
               if info["statename"] != "RUNNING" or self.answered.get(name) != info["pid"]}
        self.rounds.append((time.monotonic(), out))

    def run(self):
        while not self.halt.is_set():
            self.sample()

    def stop(self):
        self.halt.set()
        self.join(10)
        self.client.close()

    @property
    def most_out(self):
        return max(len(out) for _, out in self.rounds)


def families_on_each_worker(run, real_procs, q):
    """A running ``spawn_family`` task on each worker's own queue; ``{process name: Family}``."""
    ids = {f"{PROGRAM}_{n}": run.celery.spawn_family(hold=FAMILY_HOLD, lifetime=120, queue=f"{q}-{n}")
           for n in range(NUMPROCS)}
    out = {}
    for name, task_id in ids.items():
        marker = run.celery.wait_for_marker(task_id)
        procs = dict(zip(marker["children"], real_procs.track(*marker["children"].values())))
        assert procs.keys() == marker["children"].keys(), f"a child died early: {marker}"
        out[name] = Family(marker, procs)
    return out


def active_queues(run, nodes, timeout=1.0):
    replies = run.celery.app.control.inspect(destination=list(nodes), limit=len(nodes), timeout=timeout).active_queues()
    return {node: sorted(q["name"] for q in queues) for node, queues in (replies or {}).items()}


def test_rolling_restart_keeps_a_consumer_and_loses_nothing(case, supervisor, real_procs, project):
    """Three workers, N at a time: no probe lost, never more than N out of service, leftovers sorted out."""
    url, uid, n = case
    batches = [list(range(NUMPROCS))[i:i + n] for i in range(0, NUMPROCS, n)]
    run, q = start(supervisor, (url, uid), project)
    old = run.group_pids()
    olds = real_procs.track(*old.values())
    families = families_on_each_worker(run, real_procs, q)
    monitor, probes = Monitor(run, uid), Probes(run, q)
    wait_for(lambda: monitor.sample() or monitor.rounds[-1][1] == {}, 20, "every worker to answer the monitor")
    monitor.start()
    probes.start()
    try:
        result = rolling(run, project, "--json", "--grace", "3", "--drain-timeout", "30", "--max-unavailable", str(n))
    finally:
        probes.stop()
        monitor.stop()
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    doc = json.loads(result.stdout)

    # N processes per batch, in supervisord's order, each batch run through every phase.
    assert doc["exit_code"] == 0 and doc["problem"] is None and doc["max_unavailable"] == n
    assert [b["processes"] for b in doc["batches"]] == [[f"{PROGRAM}:{PROGRAM}_{i}" for i in b] for b in batches]
    for b, numbers in zip(doc["batches"], batches):
        assert [p["name"] for p in b["phases"]] == ["savepid", "drain", "stop", "kill", "start", "ready"]
        assert b["kill"].startswith(f"killed {len(ATTACHED) * len(numbers)}, spared {len(DETACHED) * len(numbers)}"), b
    # Progress on stderr: each batch's phases, with the time so far.
    progress = [line.split(" (")[0] for line in result.stderr.splitlines() if line.startswith("batch ")]
    assert progress == [f"batch {i}/{len(batches)}: {p}" for i in range(1, len(batches) + 1)
                        for p in ("savepid", "drain", "stop", "kill", "start", "ready")]
    # Coverage: the shared queue always had a consumer; each own queue had a gap, reported and warned
    # about (on stderr once, before the roll begins).
    lines = result.stderr.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning: queue ")]
    assert len(warned) == NUMPROCS and max(warned) < lines.index(next(x for x in lines if x.startswith("batch "))), lines
    assert doc["queues"][q] == {"covered": True, "gap": 0.0}
    for i in range(NUMPROCS):
        own = doc["queues"][f"{q}-{i}"]
        assert not own["covered"] and own["gap"] > 0
        assert any(f"queue {q}-{i} is consumed only by " in w and f"roll{uid}-{i}@" in w for w in doc["warnings"])

    # Never more than N out of service, and the monitor did see each one go.
    assert 1 <= monitor.most_out <= n, [r for r in monitor.rounds if len(r[1]) > n]
    seen_out = {name for _, out in monitor.rounds for name in out}
    assert seen_out == set(old), seen_out
    # No probe lost.
    assert len(probes.sent) > 20
    assert probes.lost(run) == []
    print(f"{url or 'filesystem'}: {len(probes.sent)} probes, longest pickup {probes.longest_pickup(run):.2f}s, "
          f"roll {doc['seconds']:.1f}s, own-queue gaps "
          + ", ".join(f"{doc['queues'][f'{q}-{i}']['gap']:.2f}s" for i in range(NUMPROCS)))

    # Every old attached leftover killed, every detached child spared; the old workers gone.
    for name, family in families.items():
        assert not any(alive(family.procs[r]) for r in ATTACHED), f"an attached leftover of {name} survived"
        assert all(alive(family.procs[r]) for r in DETACHED), f"a detached child of {name} was killed"
        assert run.celery.mark_record(family.task_id, "done")["pool_pid"] == family.pool_pid
    assert wait_gone(olds, 5) == []
    new = run.group_pids()
    assert sorted(new) == sorted(old) and set(new.values()).isdisjoint(old.values())
    assert real_procs.reap() == []


def test_a_drain_timeout_mid_roll_leaves_every_worker_consuming(supervisor, real_procs, project, tmp_path):
    """Worker 1 holds a task past the drain timeout: batch 1 stays replaced, the roll stops, exit 3.

    Worker 1 is not stopped, keeps its task and consumes its queues again;
    worker 2 is never touched. Redis.
    """
    require(REDIS_URL)
    uid = uuid.uuid4().hex[:8]
    clean_redis(REDIS_URL, uid)
    try:
        run, q = start(supervisor, (REDIS_URL, uid), project)
        nodes = run.node_names()
        old = run.group_pids()
        gate = tmp_path / "gate"
        gate.write_text("")
        task = run.celery.mark(hold=90, queue=f"{q}-1", gate=gate)
        assert run.celery.wait_for_mark(task, "started")["worker"] == old[f"{PROGRAM}_1"]
        before = active_queues(run, nodes)
        assert before == {n: sorted([q, f"{q}-{i}"]) for i, n in enumerate(nodes)}, before

        result = rolling(run, project, "--json", "--grace", "3", "--drain-timeout", "2")
        assert result.returncode == 3, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        doc = json.loads(result.stdout)
        assert doc["exit_code"] == 3 and "batch 2/3: the drain timed out" in doc["problem"]
        assert "not replaced: " in doc["problem"] and f"{PROGRAM}:{PROGRAM}_2" in doc["problem"].split("not replaced:")[1]
        first, second = doc["batches"]
        assert first["problem"] is None and second["resumed"] == {nodes[1]: [q, f"{q}-1"]}
        assert [p["name"] for p in second["phases"]] == ["savepid", "drain"]

        # Batch 1 replaced; worker 1 still the old one with its task; worker 2 untouched.
        now = run.group_pids()
        assert now[f"{PROGRAM}_0"] != old[f"{PROGRAM}_0"]
        assert now[f"{PROGRAM}_1"] == old[f"{PROGRAM}_1"] and now[f"{PROGRAM}_2"] == old[f"{PROGRAM}_2"]
        # Every worker consumes its queues (add_consumer runs on the worker's next loop: wait for it).
        wait_for(lambda: active_queues(run, nodes) == before, 15, "every worker to consume its queues again",
                 interval=0.2)
        # And takes tasks from them: the busy worker 1's other pool process takes one from its own queue.
        probe = run.celery.mark(queue=f"{q}-1")
        assert run.celery.wait_for_mark(probe, "done")["worker"] == old[f"{PROGRAM}_1"]
        gate.unlink()
        assert run.celery.wait_for_mark(task, "done")["worker"] == old[f"{PROGRAM}_1"]
        assert real_procs.reap() == []
    finally:
        clean_redis(REDIS_URL, uid)


def test_refusals_touch_nothing(supervisor, project, tmp_path):
    """A single process: exit 2, saying how to get a second; no supervisord: exit 1. The worker runs on."""
    run = supervisor(numprocs=1, stopwaitsecs=5, project_dir=project)
    run.wait_ready()
    [pid] = run.worker_pids()

    result = rolling(run, project)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert "single process" in line and "print-config --numprocs 2" in line and "plain `restart`" in line
    assert run.worker_pids() == [pid] and run.states() == {f"{PROGRAM}:{PROGRAM}_0": "RUNNING"}

    result = celery_supervise("-A", "demo", "restart", PROGRAM, "--rolling", "--supervisor-url",
                              f"unix://{tmp_path}/nobody.sock", cwd=project, env=run.env)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert "not reachable" in line and result.stdout == ""
    assert run.worker_pids() == [pid]
