"""``requeue`` against a real worker under a real supervisord, on three brokers.

The guarded filesystem transport (a folder of this test's own), Redis (db
12, flushed before and after) and RabbitMQ (a queue and node names unique
to the test, deleted afterwards: the vhost is shared). The worker runs the
demo app, which installs the task journal (in the test's folder).

Three ``demo.tasks`` run at once on one worker (``-c 3``), each appending
a line to ``<id>.runs`` every time it starts::

    A  mark       acked early   held by a gate     cut off by the stop    re-sent: runs once more
    B  mark       acked early   held by a gate     finishes after savepid not re-sent
    C  mark_late  acks_late     held by a gate     cut off by the stop    the broker gives it back

savepid records all three, B's gate opens and B finishes, then ``supervisorctl
shutdown`` with ``stopsignal=QUIT``: Celery's cold shutdown terminates A and
C in the middle (A's message was acked when it started: gone; C's was not:
the broker has it again once the worker's connection is closed).
"""

import json
import os
import stat
import uuid
from dataclasses import dataclass

import pytest

from realprocs import wait_for
from brokers import RABBITMQ_URL
from realsupervisor import copy_project
from taskfamily import celery_supervise, json_output, shutdown

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/12"  # a db of these tests' own, flushed around each test


@dataclass
class Broker:
    name: str
    url: str | None  # None: the demo's filesystem transport in the test's folder
    uid: str

    @property
    def queue(self):
        """The queue the worker consumes: on the shared RabbitMQ one of this test's own."""
        return f"requeue-{self.uid}" if self.name == "rabbitmq" else None

    @property
    def node_prefix(self):
        return f"requeue{self.uid}-"


def flush_redis():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(params=["filesystem", "redis", "rabbitmq"])
def broker(request):
    """The broker a test runs on. Request it before ``supervisor`` so it outlives the workers."""
    url = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}.get(request.param)
    b = Broker(request.param, url, uuid.uuid4().hex[:8])
    if b.name == "redis":
        flush_redis()
    yield b
    if b.name == "redis":
        flush_redis()
    elif b.name == "rabbitmq":
        from kombu import Connection

        with Connection(RABBITMQ_URL, connect_timeout=5) as conn, conn.channel() as channel:
            channel.queue_delete(b.queue)


@pytest.fixture
def project(tmp_path):
    """A private copy of the demo project: its workers are this test's only."""
    return copy_project(tmp_path / "project")


def queue_depth(client, queue):
    """Messages waiting in `queue`, counted without consuming any."""
    with client.app.connection_for_write() as conn:
        channel = conn.default_channel
        if hasattr(channel, "_size"):  # kombu's virtual transports: filesystem, Redis
            return channel._size(queue)
        return channel.queue_declare(queue, passive=True).message_count


def runs(client, task_id):
    """The runs of a ``mark`` task so far: one dict per start, in order."""
    try:
        text = (client.marker_dir / f"{task_id}.runs").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def send(client, name, gate, queue):
    return client.app.send_task(
        f"demo.tasks.{name}", kwargs={"marker_dir": str(client.marker_dir), "hold": 60, "gate": str(gate)},
        queue=queue,
    ).id


def test_requeue_resends_the_cut_off_task_once_and_leaves_the_rest(broker, supervisor, project, tmp_path):
    run = supervisor(concurrency=3, stopsignal="QUIT", stopwaitsecs=20, project_dir=project,
                     broker_url=broker.url, queues=broker.queue, node_prefix=broker.node_prefix)
    run.wait_nodes()
    client, queue = run.celery, broker.queue or "celery"
    gate_a, gate_b = tmp_path / "gate-a", tmp_path / "gate-b"
    gate_a.touch()
    gate_b.touch()
    a = send(client, "mark", gate_a, broker.queue)
    b = send(client, "mark", gate_b, broker.queue)
    c = send(client, "mark_late", gate_a, broker.queue)
    for task_id in (a, b, c):
        client.wait_for_mark(task_id, "started")
    old = set(run.worker_pids())
    state = tmp_path / "state.json"
    env = run.env

    record = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=project, env=env))
    [worker] = record["workers"]
    assert {t["id"]: t["acknowledged"] for t in worker["tasks"]} == {a: True, b: True, c: False}
    assert {t["delivery_info"]["routing_key"] for t in worker["tasks"]} == {queue}

    gate_b.unlink()  # B finishes after savepid, before the stop
    client.wait_for_mark(b, "done")
    shutdown(run)
    assert client.mark_record(a, "done") is None and client.mark_record(c, "done") is None
    back = 1  # C, given back by the broker (the filesystem transport: by the worker's clean shutdown)
    wait_for(lambda: queue_depth(client, queue) == back, 10, f"the broker to hold C again in {queue}")

    expected = {
        a: ("would re-send", "interrupted (journal: terminated)"),
        b: ("skipped", "finished (journal: SUCCESS)"),
        c: ("skipped", "back in its queue (acks_late)" if broker.name == "filesystem"
            else "redelivered by broker (acks_late)"),
    }
    ledger = tmp_path / "state.json.requeued"

    def requeue(*args):
        return celery_supervise("-A", "demo", "requeue", str(state), *args, cwd=project, env=env)

    result = requeue("--dry-run", "--json")
    doc = json_output(result)
    assert {t["id"]: (t["status"], t["reason"]) for t in doc["tasks"]} == expected
    assert doc["journal"] == str(run.journal_dir) and doc["warnings"] == [] and result.stderr == ""
    assert not ledger.exists() and queue_depth(client, queue) == back

    doc = json_output(requeue("--json"))
    expected[a] = ("re-sent", expected[a][1])
    assert {t["id"]: (t["status"], t["reason"]) for t in doc["tasks"]} == expected
    [resent] = [t for t in doc["tasks"] if t["status"] == "re-sent"]
    assert (resent["name"], resent["kwargs"]["gate"], resent["route"]["queue"]) == ("demo.tasks.mark", str(gate_a), queue)
    assert json.loads(ledger.read_text())["tasks"].keys() == {a}
    assert stat.S_IMODE(os.stat(ledger).st_mode) == 0o600
    assert queue_depth(client, queue) == back + 1

    again = requeue()  # the table this time
    assert again.returncode == 0, again.stderr
    row = next(line for line in again.stdout.splitlines() if a in line)
    assert "skipped" in row and "already requeued" in row, again.stdout
    assert again.stdout.splitlines()[-1] == "re-sent 0, skipped 3 of 3 recorded task(s)"
    assert queue_depth(client, queue) == back + 1

    # A fresh worker runs A again, and C, each exactly once; B never again.
    gate_a.unlink()
    run.start()
    run.wait_nodes()
    new = set(run.worker_pids())
    assert new.isdisjoint(old)
    for task_id in (a, c):
        client.wait_for_mark(task_id, "done")
    [node] = run.node_names()

    def settled():
        insp = client.app.control.inspect(destination=[node], limit=1, timeout=2)
        active, reserved = insp.active() or {}, insp.reserved() or {}
        return active.get(node) == [] and reserved.get(node) == [] and queue_depth(client, queue) == 0

    wait_for(settled, 15, f"{node} to hold nothing and {queue} to be empty")
    for task_id in (a, c):
        first, second = runs(client, task_id)
        assert first["worker"] in old and second["worker"] in new, (task_id, first, second)
    assert len(runs(client, b)) == 1


def test_after_a_sigkill_the_journal_says_never_finished_and_the_lost_acks_late_task_is_sent_too(
        supervisor, project, tmp_path):
    """``stopsignal=TERM`` with a 1 s ``stopwaitsecs``: the warm shutdown waits, supervisord SIGKILLs.

    No ``task_postrun`` runs, so the journal's last word on both tasks is
    ``started``. The filesystem transport kept C's unacked message only in
    the worker's memory: it is not back in the queue folder, so requeue
    sends it too, and each runs exactly once more.
    """
    run = supervisor(concurrency=2, stopsignal="TERM", stopwaitsecs=1, project_dir=project)
    run.wait_ready()
    client = run.celery
    gate = tmp_path / "gate"
    gate.touch()
    a = send(client, "mark", gate, None)
    c = send(client, "mark_late", gate, None)
    for task_id in (a, c):
        client.wait_for_mark(task_id, "started")
    old = set(run.worker_pids())
    state = tmp_path / "state.json"
    json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=project, env=run.env))
    shutdown(run)
    assert "SIGKILL" in run.log()  # supervisord's "killing 'celery-worker_0' ... with SIGKILL"
    assert queue_depth(client, "celery") == 0

    doc = json_output(celery_supervise("-A", "demo", "requeue", str(state), "--json", cwd=project, env=run.env))
    assert {t["id"]: (t["status"], t["reason"]) for t in doc["tasks"]} == {
        a: ("re-sent", "interrupted (journal: never finished)"),
        c: ("re-sent", "unacknowledged, but the transport lost it with the worker"),
    }

    gate.unlink()
    run.start()
    run.wait_ready()
    new = set(run.worker_pids())
    for task_id in (a, c):
        client.wait_for_mark(task_id, "done")
    [node] = run.node_names()

    def settled():
        insp = client.app.control.inspect(destination=[node], limit=1, timeout=2)
        active, reserved = insp.active() or {}, insp.reserved() or {}
        return active.get(node) == [] and reserved.get(node) == [] and queue_depth(client, "celery") == 0

    wait_for(settled, 15, f"{node} to hold nothing and the queue to be empty")
    for task_id in (a, c):
        first, second = runs(client, task_id)
        assert first["worker"] in old and second["worker"] in new, (task_id, first, second)
