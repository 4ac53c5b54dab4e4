"""Faults that need a broker or supervisord: the broker dies, supervisord is unreachable.

The broker is a private ``redis-server`` on a free port, started by the test
(it carries the leak guard's marker) and SIGKILLed by PID in the middle of
an operation, at a handshake (a progress line, a ledger entry), never after
a sleep. It keeps an append-only file fsynced on every write, so that what
it acknowledged before the SIGKILL is still there when it starts again:
"nothing lost" can then be checked, not assumed. (A broker without
persistence loses its queues with its process; that is the broker's
durability, not something a client can repair.)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from realprocs import reap, wait_for
from realsupervisor import copy_project
from taskfamily import CLI_TIMEOUT

pytestmark = pytest.mark.e2e


class PrivateRedis:
    """One redis-server of this test's own, on a free port, in its own folder."""

    def __init__(self, directory):
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(self._answers, 10, f"redis-server on port {self.port}")
        return self

    def _answers(self):
        assert self.proc.poll() is None, (self.dir / "redis.log").read_text()
        try:
            return self.client().ping()
        except Exception:
            return False

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def kill(self):
        """SIGKILL, by PID: the broker dies mid-operation."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def redis_server(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


def cli(project, env, *args, **popen):
    return subprocess.run([sys.executable, "-m", "celery_supervise", *args], cwd=str(project), env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL, **popen)


def error_lines(stderr):
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("celery-supervise: error: ")]


def tree(pid):
    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


def all_alive(procs):
    return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


# ------------------------------------------------------------ the broker dies


def test_drain_when_the_broker_dies_mid_poll_then_a_rerun_drains(redis_server, supervisor, project, tmp_path):
    """drain has sent its cancel and is polling; the broker dies: one line, exit 1, nothing signalled.

    The worker reconnects once the broker is back, a second drain waits for
    the running task and succeeds, and every task that was still queued
    runs on the next worker: none was lost.
    """
    run = supervisor(concurrency=1, stopsignal="QUIT", stopwaitsecs=2, project_dir=project, broker_url=redis_server.url)
    run.wait_nodes()
    client = run.celery
    long = client.mark(hold=6)
    client.wait_for_mark(long, "started")
    shorts = [client.mark() for _ in range(3)]  # one may be prefetched, the rest wait in the broker
    procs = tree(run.group_pids()["celery-worker_0"])

    err_path = tmp_path / "drain.stderr"
    with open(err_path, "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "celery_supervise", "-A", "demo", "drain", "--drain-timeout", "60"],
                                 cwd=project, env=run.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=err, text=True)
    try:
        wait_for(lambda: "draining:" in err_path.read_text() or first.poll() is not None, 30, "drain to poll")
        assert first.poll() is None, err_path.read_text()
        redis_server.kill()
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stderr = err_path.read_text()
    (line,) = error_lines(stderr)
    assert first.returncode == 1, stderr
    assert "cancel" in line, line  # it says the workers may no longer consume their queues
    assert all_alive(procs), "a broker failure must not signal anything"
    assert client.mark_record(long, "done") is None  # the task was not cut off either

    redis_server.start()  # the same folder: its append-only file brings the queue back
    second = cli(project, run.env, "-A", "demo", "drain", "--drain-timeout", "60", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["drained"] is True
    assert client.mark_record(long, "done") is not None

    restarted = run.ctl("restart", "celery-worker:*")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    # A task the worker had prefetched when the broker died sits in Redis'
    # unacked hash, held for the transport's visibility_timeout (an hour by
    # default) and then delivered again: delayed, not lost.
    held = {json.loads(v)[0]["headers"]["id"] for v in redis_server.client().hvals("unacked")}
    assert held <= set(shorts) | {long}, held
    for task_id in shorts:
        if task_id not in held:
            client.wait_for_mark(task_id, "done")


def test_savepid_with_the_broker_down_exits_3_keeps_the_trees_and_a_rerun_completes(
        redis_server, supervisor, project, tmp_path):
    run = supervisor(concurrency=1, stopsignal="QUIT", stopwaitsecs=2, project_dir=project, broker_url=redis_server.url)
    run.wait_nodes()
    task = run.celery.mark(hold=30)
    run.celery.wait_for_mark(task, "started")
    main = run.group_pids()["celery-worker_0"]
    procs = tree(main)
    state = tmp_path / "state.json"

    redis_server.kill()
    res = cli(project, run.env, "-A", "demo", "savepid", str(state), "--json")
    assert res.returncode == 3, res.stderr
    (line,) = error_lines(res.stderr)
    assert "the broker failed" in line and "run savepid again" in line
    doc = json.loads(state.read_text())
    assert [w["main"] for w in doc["workers"]] == [main] and doc["workers"][0]["tasks"] == []
    assert all_alive(procs)

    redis_server.start()
    def answers():
        try:
            return run.celery.ping()
        except Exception:  # the test's own client connection died with the first broker
            return False

    wait_for(answers, 60, "the worker to reconnect")
    res = cli(project, run.env, "-A", "demo", "savepid", str(state), "--json")
    assert res.returncode == 0, res.stderr
    assert [t["id"] for t in json.loads(state.read_text())["workers"][0]["tasks"]] == [task]


def test_requeue_when_the_broker_dies_mid_send_then_a_rerun_sends_the_rest(redis_server, project, tmp_path):
    """Exit 3 and a line saying to run it again; the ledger names exactly what the broker kept;
    the rerun sends the rest: every task is in the queue, once."""
    from celery_supervise.processes import plan, snapshot, statefile
    from celery_supervise.processes.plan import Policy
    from celery_supervise.processes.snapshot import Task

    count = 200
    ids = [f"fault-{uuid.uuid4().hex[:8]}-{n}" for n in range(count)]
    me = snapshot.read_worker(os.getpid())  # requeue never signals: any live process will do
    tasks = tuple(Task(id=i, name="demo.tasks.mark", args=[], kwargs={"marker_dir": str(tmp_path)},
                       delivery_info={"exchange": "", "routing_key": "faults"}, worker_pid=os.getpid(),
                       acknowledged=True, time_start=time.time()) for i in ids)
    worker = snapshot.Worker(main=me.main, procs=(me.main,), node="faults@x", app="demo", tasks=tasks)
    state = tmp_path / "state.json"
    statefile.write(str(state), statefile.to_document(snapshot.take([worker], "control"), Policy(),
                                                      plan.plan([worker], Policy())))
    ledger = tmp_path / "state.json.requeued"
    env = dict(os.environ, CELERY_BROKER_URL=redis_server.url, CELERY_SUPERVISE_JOURNAL_DIR=str(tmp_path / "j"))
    args = [sys.executable, "-m", "celery_supervise", "-A", "demo", "requeue", str(state), "--json"]

    def sent():
        try:
            return len(json.loads(ledger.read_text())["tasks"])
        except (FileNotFoundError, ValueError):
            return 0

    first = subprocess.Popen(args, cwd=project, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sent() >= 5 or first.poll() is not None, 30, "the first re-sent tasks in the ledger")
        assert first.poll() is None, "requeue finished before the broker could be killed; raise count"
        redis_server.kill()
        out, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 3, err
    doc = json.loads(out)
    assert doc["summary"]["failed"] > 0 and "run requeue again" in err
    in_ledger = set(json.loads(ledger.read_text())["tasks"])

    redis_server.start()
    queued = [json.loads(m)["headers"]["id"] for m in redis_server.client().lrange("faults", 0, -1)]
    # The one publish the broker may have kept without answering is the only possible extra.
    assert in_ledger <= set(queued) and len(set(queued) - in_ledger) <= 1

    second = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 0, second.stderr
    queued = [json.loads(m)["headers"]["id"] for m in redis_server.client().lrange("faults", 0, -1)]
    assert set(queued) == set(ids)
    assert len(queued) - count <= 1  # that same one, at most: at-least-once, never lost


# ------------------------------------------------------ supervisord unreachable


def test_supervisord_unreachable_restart_and_savepid_exit_1(supervisor, project, tmp_path):
    """A URL nobody listens on, a socket that is gone, a supervisord SIGKILLed: one line, exit 1, nothing done."""
    run = supervisor(concurrency=1, stopsignal="QUIT", stopwaitsecs=2, project_dir=project)
    run.wait_nodes()
    procs = tree(run.group_pids()["celery-worker_0"])
    state = tmp_path / "state.json"
    state.write_text("previous record\n")
    os.chmod(state, 0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
    gone = f"unix://{tmp_path}/no-such.sock"

    def unreachable(url):
        for args in (["restart", "celery-worker:*", "--supervisor-url", url],
                     ["savepid", str(state), "--supervisor-url", url]):
            res = cli(project, run.env, "-A", "demo", *args)
            assert res.returncode == 1, (args, res.stderr)
            (line,) = error_lines(res.stderr)
            assert f"supervisord at {url}" in line, line
            assert state.read_text() == "previous record\n"
            assert all_alive(procs)

    unreachable(nobody)
    unreachable(gone)
    run.proc.kill()  # supervisord SIGKILLed: its socket file is left, nobody answers on it
    run.proc.wait(10)
    try:
        unreachable(f"unix://{run.socket}")
    finally:
        assert reap(reversed(procs)) == []  # the worker supervisord left behind, by PID
