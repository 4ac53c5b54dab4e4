"""``restart --rolling``'s plan on hand-written data: batches, refusals, lonely queues, the report.

What it does to real workers is proven in tests/test_e2e_rolling.py.
"""

import pytest

from celery_supervise import cli
from celery_supervise.commands import restart as restarting
from celery_supervise.commands import rolling
from celery_supervise.errors import EXIT_USAGE, UsageError

W = [f"celery-worker:celery-worker_{n}" for n in range(5)]


@pytest.mark.parametrize("processes, n, expected", [
    (W[:2], 1, [(W[0],), (W[1],)]),
    (W[:3], 1, [(W[0],), (W[1],), (W[2],)]),
    (W[:3], 2, [(W[0], W[1]), (W[2],)]),
    (W[:5], 2, [(W[0], W[1]), (W[2], W[3]), (W[4],)]),
    (W[:4], 3, [(W[0], W[1], W[2]), (W[3],)]),
])
def test_batches_keep_supervisords_order(processes, n, expected):
    assert rolling.batches_of(processes, n) == expected


@pytest.mark.parametrize("processes, n, words", [
    (W[:1], 1, ["single process", "print-config --numprocs 2", "plain `restart`"]),
    ([], 1, ["single process"]),
    (W[:3], 3, ["--max-unavailable 3", "all 3 processes", "at most 2"]),
    (W[:2], 5, ["--max-unavailable 5", "at most 1"]),
])
def test_a_roll_that_would_leave_no_consumer_is_refused(processes, n, words):
    with pytest.raises(rolling.RollRefused) as caught:
        rolling.batches_of(processes, n)
    assert caught.value.exit_code == EXIT_USAGE
    assert "\n" not in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_max_unavailable_must_be_positive():
    with pytest.raises(UsageError):
        rolling.batches_of(W[:3], 0)


@pytest.mark.parametrize("batch, queues, expected", [
    # every worker on one shared queue: nothing lonely
    (["a"], {"a": ["celery"], "b": ["celery"]}, {}),
    # each also on a queue of its own: that one has a gap
    (["a"], {"a": ["celery", "own-a"], "b": ["celery", "own-b"]}, {"own-a": ("a",)}),
    # a queue shared by the two nodes of one batch: a gap, naming both
    (["a", "b"], {"a": ["x"], "b": ["x"], "c": ["celery"]}, {"x": ("a", "b")}),
    # a node outside the named programs (another program here) still covers
    (["a"], {"a": ["x"], "other": ["x"]}, {}),
    # a node whose queues are unknown covers nothing and has none
    (["a"], {"b": ["x"]}, {}),
])
def test_lonely_queues(batch, queues, expected):
    assert rolling.lonely_queues(batch, queues) == expected


def test_plan_names_nodes_and_warns_per_lonely_queue():
    node_of = {W[0]: "w0@h", W[1]: "w1@h"}  # W[2] is not running: no node
    queues = {"w0@h": ["celery", "w0"], "w1@h": ["celery", "w1"]}
    p = rolling.plan(W[:3], node_of, queues, 1)
    assert [(b.number, b.processes, b.nodes) for b in p.batches] == [
        (1, (W[0],), ("w0@h",)), (2, (W[1],), ("w1@h",)), (3, (W[2],), ())]
    assert [dict(b.lonely) for b in p.batches] == [{"w0": ("w0@h",)}, {"w1": ("w1@h",)}, {}]
    assert p.warnings() == [
        "queue w0 is consumed only by w0@h (batch 1/3): it has no consumer while that batch is replaced",
        "queue w1 is consumed only by w1@h (batch 2/3): it has no consumer while that batch is replaced",
    ]


def batch_result(number, processes, gap, problem=None, answered=True):
    b = rolling.BatchResult(number, processes, gap=gap, problem=problem)
    b.phases = [restarting.Phase(name, 1.0) for name in (restarting.SAVEPID, restarting.DRAIN, restarting.STOP, restarting.KILL, restarting.START,
                                                      restarting.READY)]
    if answered:
        b.new_nodes = {f"w{number - 1}@h": 2.0}
    return b


def test_queue_gaps_report_the_longest_gap_of_lonely_queues_only():
    p = rolling.plan(W[:2], {W[0]: "w0@h", W[1]: "w1@h"},
                     {"w0@h": ["celery", "w0", "pair"], "w1@h": ["celery", "w1", "pair"]}, 1)
    result = rolling.RollingResult(p, 1, [batch_result(1, (W[0],), 4.25), batch_result(2, (W[1],), 3.5)])
    assert result.queue_gaps() == {
        "celery": {"covered": True, "gap": 0.0},
        "pair": {"covered": True, "gap": 0.0},
        "w0": {"covered": False, "gap": 4.25},
        "w1": {"covered": False, "gap": 3.5},
    }
    doc = result.to_document()
    assert doc["exit_code"] == 0 and doc["batches_planned"] == [[W[0]], [W[1]]]
    assert [b["phases"][0]["name"] for b in doc["batches"]] == ["savepid", "savepid"]
    assert doc["seconds"] == 12.0
    assert result.lines()[-1] == "total 12.00s, 2 of 2 batch(es) run"


def test_a_roll_stopped_short_exits_3_and_leaves_unrun_batches_gapless():
    p = rolling.plan(W[:3], {W[n]: f"w{n}@h" for n in range(3)}, {f"w{n}@h": [f"w{n}"] for n in range(3)}, 1)
    result = rolling.RollingResult(p, 1, [batch_result(1, (W[0],), 2.0),
                                          batch_result(2, (W[1],), None, problem="the drain timed out", answered=False)])
    result.problem = "batch 2/3: the drain timed out"
    assert result.exit_code == 3
    assert rolling._replaced(result) == (f"replaced: {W[0]}; not replaced: {W[1]}, {W[2]} "
                                         "(run restart --rolling again to finish)")
    gaps = result.queue_gaps()
    assert gaps["w0"]["gap"] == 2.0 and gaps["w1"]["gap"] is None and gaps["w2"]["gap"] == 0.0
    assert result.lines()[-1] == "not done: batch 2/3: the drain timed out"


def test_max_unavailable_without_rolling_is_a_usage_error(capsys):
    assert cli.run(["restart", "celery-worker", "--max-unavailable", "2"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == "celery-supervise: usage: --max-unavailable goes with --rolling"


def test_manage_py_knows_the_rolling_options(tmp_path):
    """The Django command gets ``--rolling`` and ``--max-unavailable`` from the CLI's table."""
    from test_django_command import manage

    result = manage("restart", "celery-worker", "--max-unavailable", "2", tmp_path=tmp_path)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == "CommandError: --max-unavailable goes with --rolling"
    result = manage("restart", "--help", tmp_path=tmp_path)
    assert "--rolling" in result.stdout and "--max-unavailable" in result.stdout


def _brpop_follows_polling_interval() -> bool:
    """Newer kombu sets its Redis BRPOP timeout from ``polling_interval``; 5.3 always blocks 1 s."""
    from kombu.transport import redis

    return hasattr(redis.Transport, "brpop_timeout")


@pytest.mark.parametrize("url, options, expected", [
    ("redis://127.0.0.1:6379/3", {}, 1.0),  # kombu's BRPOP timeout
    ("redis://127.0.0.1:6379/3", {"polling_interval": 2}, "2.0 where kombu follows it, else 1.0"),
    ("memory://", {}, 0.0),
])
def test_fetch_window_is_the_brokers_blocking_fetch(url, options, expected):
    """Read from the transport only; no connection is made."""
    from celery import Celery

    if isinstance(expected, str):
        expected = 2.0 if _brpop_follows_polling_interval() else 1.0

    app = Celery("fetch-window", broker=url, set_as_current=False)
    app.conf.broker_transport_options = options
    try:
        assert rolling.fetch_window(app) == expected
    finally:
        app.close()
