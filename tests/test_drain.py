"""The drain, on plain data: the plan is pure, the loop runs on a scripted remote.

No broker here. :class:`FakeRemote` plays a worker's replies round by round
on a fake clock; a missing reply costs the call its whole timeout, as it
does against a real broker. The e2e tests (test_e2e_drain.py) run the same
code against real workers on three brokers.
"""

import io
import json

import pytest
from kombu import Queue
from rich.console import Console

from celery_supervise import render as report
from celery_supervise.commands import drain as drain_cmd
from celery_supervise.celery_side.discovery import WorkerCommand
from celery_supervise.celery_side.drain import (
    ACTIVE, POLL_INTERVAL, POLL_WAIT, RESERVED, Assessment, Drainer, DrainResult, Held, Target, assess, cancels,
    configured_queues, local_targets, more_cancels, named_targets, queue_names,
)
from celery_supervise.errors import EXIT_OK, EXIT_PARTIAL, BrokerError, UsageError
from celery_supervise.processes.snapshot import Task

A, B = "a@host", "b@host"


def task(id, name="proj.slow", time_start=None, worker_pid=None):
    return {"id": id, "name": name, "time_start": time_start, "worker_pid": worker_pid,
            "args": [], "kwargs": {}, "delivery_info": {}}


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    "default, task_queues, expected",
    [
        ("celery", None, ("celery",)),
        ("celery", (), ("celery",)),
        ("default", [Queue("default"), Queue("video")], ("default", "video")),
        ("celery", {"video": {}, "mail": {}}, ("celery", "video", "mail")),
        ("celery", ["celery", "mail"], ("celery", "mail")),  # names, and no duplicate
        (None, [Queue("only")], ("only",)),
    ],
    ids=["default only", "empty task_queues", "Queue objects", "dict", "names", "no default"],
)
def test_configured_queues(default, task_queues, expected):
    assert configured_queues(default, task_queues) == expected


def test_local_targets_read_queues_from_the_command_line_or_the_app():
    workers = {
        300: WorkerCommand("demo", A, ("video", "mail")),  # -Q video,mail
        100: WorkerCommand("demo", B),  # no -Q: the app's queues
    }
    assert local_targets(workers, ("celery",)) == [Target(B, ("celery",), 100), Target(A, ("video", "mail"), 300)]


def test_local_targets_merge_two_processes_claiming_one_node_name():
    workers = {100: WorkerCommand("demo", A, ("video",)), 200: WorkerCommand("demo", A)}
    assert local_targets(workers, ("celery",)) == [Target(A, ("video", "celery"), 100)]


def test_named_targets_use_what_is_known_locally():
    local = [Target(A, ("celery",), 100)]
    assert named_targets([A, "elsewhere@host", A], local) == [Target(A, ("celery",), 100), Target("elsewhere@host")]


def test_cancels_group_nodes_by_queue_and_give_unknown_nodes_the_app_queues():
    targets = [Target(A, ("celery", "video"), 1), Target(B, ("celery",), 2), Target("far@host")]
    assert cancels(targets, ("celery", "mail")) == [
        ("celery", (A, B, "far@host")),
        ("video", (A,)),
        ("mail", ("far@host",)),
    ]


@pytest.mark.parametrize(
    "reply, names",
    [
        ([{"name": "celery", "exchange": {}}, {"name": "video"}], ("celery", "video")),
        ([], ()),
        ({"error": "boom"}, ()),
        ([{"no": "name"}, "junk", {"name": ""}], ()),
    ],
)
def test_queue_names(reply, names):
    assert queue_names(reply) == names


def test_more_cancels_only_what_was_not_sent():
    sent = [("celery", (A,)), ("mail", None)]  # mail went to every worker
    replies = {A: [{"name": "celery"}, {"name": "video"}, {"name": "mail"}], B: [{"name": "celery"}]}
    assert more_cancels(replies, sent) == [("video", (A,)), ("celery", (B,))]


# Each case: (replies to reserved, replies to active, nodes that answered an
# earlier round) -> (held as (node, state, id), silent, unconfirmed, drained).
ASSESS = [
    ("all empty, seen before", {A: []}, {A: []}, {A}, [], [], [], True),
    ("first empty answer", {A: []}, {A: []}, set(), [], [], [A], False),
    ("one running", {A: []}, {A: [task("t1")]}, {A}, [(A, ACTIVE, "t1")], [], [], False),
    ("one prefetched", {A: [task("t2")]}, {A: []}, {A}, [(A, RESERVED, "t2")], [], [], False),
    ("no reply", {}, {}, {A}, [], [A], [], False),
    ("no reply to active", {A: []}, {}, {A}, [], [A], [], False),
    ("error reply", {A: {"error": "boom"}}, {A: []}, {A}, [], [A], [], False),
    ("unreadable entry still counts", {A: []}, {A: ["junk"]}, {A}, [(A, ACTIVE, "?")], [], [], False),
    ("a stranger's reply is ignored", {A: [], "x@y": [task("t9")]}, {A: []}, {A}, [], [], [], True),
]


@pytest.mark.parametrize("reserved, active, before, held, silent, unconfirmed, drained",
                         [c[1:] for c in ASSESS], ids=[c[0] for c in ASSESS])
def test_assess(reserved, active, before, held, silent, unconfirmed, drained):
    got = assess([A], reserved, active, before)
    assert [(h.node, h.state, h.task.id) for h in got.held] == held
    assert (list(got.silent), list(got.unconfirmed), got.drained) == (silent, unconfirmed, drained)


def test_assess_two_nodes_one_busy():
    got = assess([A, B], {A: [], B: []}, {A: [], B: [task("t1")]}, {A, B})
    assert got.busy == (B,) and not got.drained


def test_runtime_from_the_workers_wall_clock_start():
    held = Held(A, ACTIVE, Task.from_reply(task("t1", time_start=1000.0)))
    assert held.runtime(1002.5) == 2.5
    assert Held(A, RESERVED, Task.from_reply(task("t2"))).runtime(1002.5) is None


# ----------------------------------------------------------------- the loop


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def wall(self):
        return 1000.0 + self.now

    def sleep(self, seconds):
        self.now += seconds


class FakeRemote:
    """Scripted replies: ``script[command]`` is a list of ``{node: reply}``, one per call.

    The last entry repeats. A call that does not get a reply from every
    node asked costs its timeout.
    """

    def __init__(self, clock, script, fail_on=None):
        self.clock = clock
        self.script = {k: list(v) for k, v in script.items()}
        self.calls = []
        self.fail_on = fail_on

    def cancel_consumer(self, queue, nodes, valid_for):
        self.calls.append(("cancel", queue, nodes))
        self.valid_for = valid_for

    def inspect(self, command, nodes, timeout):
        self.calls.append((command, tuple(nodes) if nodes is not None else None))
        if command == self.fail_on:
            raise BrokerError("broker went away")
        replies = self.script[command]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        reply = {n: r for n, r in reply.items() if nodes is None or n in nodes}
        if nodes is None or set(reply) != set(nodes):
            self.clock.now += timeout
        else:
            self.clock.now += 0.01
        return reply


def drainer(remote, clock, progress=None):
    return Drainer(remote, clock=clock, wall=clock.wall, sleep=clock.sleep, on_progress=progress)


def test_cancels_go_out_before_any_question_and_a_busy_worker_is_waited_for():
    """A worker stuck behind its backlog answers nothing, then its last task, then nothing."""
    clock = Clock()
    remote = FakeRemote(clock, {
        RESERVED: [{}, {}, {A: []}, {A: []}],
        ACTIVE: [{A: [task("t1", time_start=1001.0)]}, {A: []}],
    })
    seen = []
    result = drainer(remote, clock, lambda a, elapsed, timeout: seen.append((len(a.held), a.silent))).run(
        [Target(A, ("celery", "video"), 100)], ("celery",), timeout=30)
    assert remote.calls == [
        ("cancel", "celery", [A]), ("cancel", "video", [A]),
        (RESERVED, (A,)),  # no reply: active is not asked
        (RESERVED, (A,)),
        (RESERVED, (A,)), (ACTIVE, (A,)),  # t1 still running
        (RESERVED, (A,)), (ACTIVE, (A,)),  # empty, and A answered before: drained
    ]
    assert seen == [(0, (A,)), (0, (A,)), (1, ()), (0, ())]
    assert remote.valid_for == 30  # a cancel is meant to be read late: it lasts the drain
    assert result.drained and result.held == () and result.silent == ()
    assert result.cancelled == (("celery", (A,)), ("video", (A,)))
    # Two silent rounds cost their wait, the busy one is padded to POLL_INTERVAL.
    assert result.elapsed == pytest.approx(2 * POLL_WAIT + POLL_INTERVAL + 2 * 0.01)
    assert result.exit_code == EXIT_OK


def test_an_idle_worker_takes_two_rounds_and_no_pause():
    clock = Clock()
    remote = FakeRemote(clock, {RESERVED: [{A: []}], ACTIVE: [{A: []}]})
    result = drainer(remote, clock).run([Target(A, ("celery",))], ("celery",), timeout=5)
    assert result.drained
    assert [c[0] for c in remote.calls] == ["cancel", RESERVED, ACTIVE, RESERVED, ACTIVE]
    assert clock.now == pytest.approx(0.04)  # no pause between a first empty answer and its confirmation


def test_timeout_names_every_task_still_held():
    clock = Clock()
    remote = FakeRemote(clock, {
        RESERVED: [{A: [task("t2")], B: []}],
        ACTIVE: [{A: [task("t1", "proj.slow", time_start=1000.0, worker_pid=7)], B: []}],
    })
    result = drainer(remote, clock).run([Target(A, ("celery",)), Target(B, ("celery",))], ("celery",), timeout=1)
    assert not result.drained
    assert [(h.node, h.state, h.task.id) for h in result.held] == [(A, ACTIVE, "t1"), (A, RESERVED, "t2")]
    assert result.finished_at == clock.wall()
    assert result.held[0].runtime(result.finished_at) == pytest.approx(clock.now)
    assert result.exit_code == EXIT_PARTIAL


def test_timeout_with_a_silent_worker_keeps_what_it_last_said():
    clock = Clock()
    remote = FakeRemote(clock, {RESERVED: [{A: []}, {}], ACTIVE: [{A: [task("t1")]}]})
    result = drainer(remote, clock).run([Target(A, ("celery",))], ("celery",), timeout=2)
    assert not result.drained
    assert result.silent == (A,)
    assert [h.task.id for h in result.held] == ["t1"]


def test_a_last_round_cut_short_by_the_deadline_does_not_make_a_worker_silent():
    """A answered 0.1 s ago, then the deadline left its last question 0.05 s: judged by its last answer."""
    clock = Clock()
    remote = FakeRemote(clock, {RESERVED: [{A: []}, {}], ACTIVE: [{A: [task("t1")]}]})
    result = drainer(remote, clock).run([Target(A, ("celery",))], ("celery",), timeout=0.15)
    assert clock.now == pytest.approx(0.15)
    assert not result.drained and result.silent == ()
    assert [h.task.id for h in result.held] == ["t1"]


def test_an_empty_first_answer_at_the_deadline_counts_as_drained():
    clock = Clock()
    remote = FakeRemote(clock, {RESERVED: [{A: []}], ACTIVE: [{A: []}]})
    result = drainer(remote, clock).run([Target(A, ("celery",))], ("celery",), timeout=0.01)
    assert result.drained
    assert [c[0] for c in remote.calls] == ["cancel", RESERVED, ACTIVE]


def test_named_worker_elsewhere_gets_the_app_queues_then_its_own():
    clock = Clock()
    remote = FakeRemote(clock, {
        "active_queues": [{B: [{"name": "celery"}, {"name": "video"}]}],
        RESERVED: [{A: [], B: []}], ACTIVE: [{A: [], B: []}],
    })
    result = drainer(remote, clock).run([Target(A, ("celery",), 100), Target(B)], ("celery",), timeout=5)
    assert remote.calls[:4] == [
        ("cancel", "celery", [A, B]),  # first, before asking anything
        ("active_queues", (B,)),  # only the node whose queues are unknown
        ("cancel", "video", [B]),
        (RESERVED, (A, B)),
    ]
    assert result.drained and result.warnings == []
    assert result.queues_of(B) == ["celery", "video"]


def test_named_worker_that_does_not_say_its_queues_is_warned_about():
    clock = Clock()
    remote = FakeRemote(clock, {"active_queues": [{}], RESERVED: [{B: []}], ACTIVE: [{B: []}]})
    result = drainer(remote, clock).run([Target(B)], ("celery",), timeout=5)
    assert result.drained
    assert result.warnings == [f"{B} did not say which queues it consumes; only the app's queues (celery) "
                               "were cancelled there"]


def test_all_cancels_everyone_then_drains_whoever_answered():
    clock = Clock()
    remote = FakeRemote(clock, {
        "active_queues": [{A: [{"name": "celery"}], B: [{"name": "celery"}, {"name": "mail"}]}],
        RESERVED: [{A: [], B: []}], ACTIVE: [{A: [], B: []}],
    })
    result = drainer(remote, clock).run(None, ("celery",), timeout=5)
    assert remote.calls[:3] == [("cancel", "celery", None), ("active_queues", None), ("cancel", "mail", [B])]
    assert [t.node for t in result.targets] == [A, B]
    assert result.everyone and result.drained
    assert result.cancelled == (("celery", None), ("mail", (B,)))


def test_all_with_nobody_answering_is_drained_with_a_warning():
    clock = Clock()
    remote = FakeRemote(clock, {"active_queues": [{}]})
    result = drainer(remote, clock).run(None, ("celery",), timeout=5)
    assert result.drained and result.targets == ()
    assert "no worker answered" in result.warnings[0]


def test_broker_failure_after_the_cancel_says_the_cancel_was_sent():
    clock = Clock()
    remote = FakeRemote(clock, {}, fail_on=RESERVED)
    with pytest.raises(BrokerError, match="the cancel was already sent.*celery"):
        drainer(remote, clock).run([Target(A, ("celery",))], ("celery",), timeout=5)


def test_broker_failure_before_any_cancel_went_out_is_plain():
    class Dead(FakeRemote):
        def cancel_consumer(self, queue, nodes, valid_for):
            raise BrokerError("broker went away")

    with pytest.raises(BrokerError) as caught:
        drainer(Dead(Clock(), {}), Clock()).run([Target(A, ("celery",))], ("celery",), timeout=5)
    assert str(caught.value) == "broker went away"


# ------------------------------------------------------------ operations


class NoRemote:
    def __init__(self, app):
        raise AssertionError("no broker call expected")


@pytest.fixture
def celery_app():
    from celery import Celery

    app = Celery("drain-tests", set_as_current=False)
    yield app
    app.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(app_spec=None), "drain needs -A APP"),
        (dict(destinations=[A], all_workers=True), "--destination and --all exclude each other"),
        (dict(timeout=0), "--drain-timeout must be positive"),
    ],
)
def test_drain_usage_errors(celery_app, kwargs, message):
    args = {"app_spec": "nosuchproject_xyz", "remote_factory": NoRemote, **kwargs}
    with pytest.raises(UsageError, match=message):
        drain_cmd.drain(celery_app, **args)


def test_no_local_worker_means_nothing_to_drain(celery_app):
    result = drain_cmd.drain(celery_app, "nosuchproject_xyz", remote_factory=NoRemote)
    assert result.drained and result.targets == ()
    assert "no Celery worker of nosuchproject_xyz is running on this host" in result.warnings[0]


def test_destination_expands_percent_h_and_uses_the_apps_queues(celery_app):
    import socket

    node = f"w1@{socket.gethostname()}"
    celery_app.conf.task_default_queue = "jobs"
    remotes = []

    class Remote(FakeRemote):
        def __init__(self, app):
            super().__init__(Clock(), {"active_queues": [{node: [{"name": "jobs"}]}],
                                       RESERVED: [{node: []}], ACTIVE: [{node: []}]})
            remotes.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    result = drain_cmd.drain(celery_app, "nosuchproject_xyz", destinations=["w1@%h"], timeout=5,
                              remote_factory=Remote)
    assert [t.node for t in result.targets] == [node]
    assert result.drained
    assert remotes[0].calls[:2] == [("cancel", "jobs", [node]), ("active_queues", (node,))]


# ----------------------------------------------------------------- report


def result_timed_out():
    held = (
        Held(A, ACTIVE, Task.from_reply(task("t1", "proj.slow", time_start=990.0, worker_pid=7))),
        Held(A, RESERVED, Task.from_reply(task("t2", "proj.fast"))),
    )
    return DrainResult(targets=(Target(A, ("celery",), 100), Target(B, ("celery",))),
                       cancelled=(("celery", (A, B)),), drained=False, elapsed=10.02, timeout=10.0,
                       held=held, silent=(B,), finished_at=1000.0)


def consoles():
    out, err = io.StringIO(), io.StringIO()
    return out, err, *report.consoles(out, err)


def test_timeout_json_names_each_task():
    out, err, out_c, err_c = consoles()
    assert report.render_drain(out_c, err_c, result_timed_out(), as_json=True) == EXIT_PARTIAL
    doc = json.loads(out.getvalue())
    assert doc["drained"] is False and doc["exit_code"] == 3
    assert [(t["node"], t["id"], t["name"], t["state"], t["runtime"], t["worker_pid"]) for t in doc["tasks"]] == [
        (A, "t1", "proj.slow", "active", 10.0, 7),
        (A, "t2", "proj.fast", "reserved", None, None),
    ]
    assert doc["not_answering"] == [B]
    assert doc["workers"] == [
        {"node": A, "pid": 100, "queues": ["celery"], "answered": True, "drained": False},
        {"node": B, "pid": None, "queues": ["celery"], "answered": False, "drained": False},
    ]


def test_timeout_table_names_each_task():
    out, err, out_c, err_c = consoles()
    assert report.render_drain(out_c, err_c, result_timed_out(), as_json=False) == EXIT_PARTIAL
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "t1" in line)
    assert all(word in row for word in (A, "proj.slow", "active", "10.0s", "7")), text
    assert "not started" in next(line for line in text.splitlines() if "t2" in line)
    assert text.splitlines()[-1] == (f"timed out after 10.0s: 1 task(s) still running and 1 prefetched on "
                                     f"1 worker(s); 1 worker(s) did not answer ({B})")


def test_drained_text():
    result = DrainResult(targets=(Target(A, ("celery", "video"), 100),), cancelled=(("celery", (A,)), ("video", (A,))),
                         drained=True, elapsed=2.34, timeout=60.0)
    out, err, out_c, err_c = consoles()
    assert report.render_drain(out_c, err_c, result, as_json=False) == EXIT_OK
    assert out.getvalue().splitlines() == ["drained 1 worker(s) in 2.3s", f"  {A} (PID 100): no longer consumes celery, video"]


def test_plain_progress_lines_at_most_once_a_second():
    err = io.StringIO()
    progress = report.DrainProgress(report.consoles(None, err)[1])
    busy = Assessment(held=(Held(A, ACTIVE, Task.from_reply(task("t1"))),))
    for elapsed in (0.0, 0.3, 0.9, 1.0, 1.5, 2.2):
        progress(busy, elapsed, 60.0)
    progress(Assessment(silent=(A,)), 2.5, 60.0)
    progress.close()
    assert err.getvalue().splitlines() == [
        "draining: 1 task(s) left, 0.0s of 60s",
        "draining: 1 task(s) left, 1.0s of 60s",
        "draining: 1 task(s) left, 2.2s of 60s",
    ]


def test_terminal_progress_is_a_bar_that_goes_away():
    err = io.StringIO()
    console = Console(file=err, force_terminal=True, width=100)
    progress = report.DrainProgress(console)
    two = Assessment(held=(Held(A, ACTIVE, Task.from_reply(task("t1"))), Held(A, RESERVED, Task.from_reply(task("t2")))))
    progress(two, 0.0, 60.0)
    progress(Assessment(held=two.held[:1]), 0.5, 60.0)
    assert progress.progress is not None
    task_ = progress.progress.tasks[0]
    assert (task_.completed, task_.total, task_.description) == (1, 2, "1 task(s) left")
    progress.close()
    assert progress.progress is None
    assert "draining" in err.getvalue() and "of 60s" in err.getvalue()
