"""The pure parts of ``restart``: names, finding supervisord, the ping wait, the cancel clock."""

import pytest

from celery_supervise.supervisord import rpc
from celery_supervise.errors import SupervisorError
from celery_supervise.commands.restart import CancelClock, RestartResult, wait_answering


def info(group, name):
    return {"group": group, "name": name, "statename": "RUNNING", "pid": 1}


#: What getAllProcessInfo says: a numprocs=2 program, a plain one, and a
#: group of two programs (``[group:web]``) whose process names are unique.
INFOS = [
    info("celery-worker", "celery-worker_0"),
    info("celery-worker", "celery-worker_1"),
    info("beat", "beat"),
    info("web", "gunicorn"),
    info("web", "flower"),
]


@pytest.mark.parametrize("names, expected", [
    (["celery-worker:*"], ["celery-worker:celery-worker_0", "celery-worker:celery-worker_1"]),
    (["celery-worker"], ["celery-worker:celery-worker_0", "celery-worker:celery-worker_1"]),
    (["celery-worker:celery-worker_1"], ["celery-worker:celery-worker_1"]),
    (["celery-worker_1"], ["celery-worker:celery-worker_1"]),
    (["beat"], ["beat"]),
    (["beat:beat"], ["beat"]),
    (["beat:*"], ["beat"]),
    (["web:flower", "web"], ["web:flower", "web:gunicorn"]),
    (["gunicorn"], ["web:gunicorn"]),
    (["celery-worker:*", "celery-worker:celery-worker_0", "beat"],
     ["celery-worker:celery-worker_0", "celery-worker:celery-worker_1", "beat"]),
])
def test_expand_names(names, expected):
    assert rpc.expand_names(names, INFOS) == expected


@pytest.mark.parametrize("names, message", [
    (["nope"], "no such program or process: nope (known: beat:*, celery-worker:*, web:*)"),
    (["celery-worker:nope", "beat"], "no such program or process: celery-worker:nope"),
    (["nope:*"], "no such program or process: nope:*"),
    (["celery-worker_*"], "no such program or process: celery-worker_*"),  # no globs, as supervisorctl
])
def test_unknown_names_fail_before_anything_is_done(names, message):
    with pytest.raises(SupervisorError, match=message.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        rpc.expand_names(names, INFOS)


def test_a_bare_name_in_two_groups_is_ambiguous():
    infos = [info("a", "worker"), info("b", "worker")]
    with pytest.raises(SupervisorError, match="several groups"):
        rpc.expand_names(["worker"], infos)
    assert rpc.expand_names(["a:worker"], infos) == ["a:worker"]


# ------------------------------------------------------------ find_server


SUPERVISORCTL = """\
[unix_http_server]
file=%(here)s/run/supervisor.sock

[supervisorctl]
serverurl=unix://%(here)s/run/supervisor.sock
username=alice
password=s3cret
"""


@pytest.mark.parametrize("url, use_conf, expected", [
    ("http://10.0.0.1:9001", False, ("http://10.0.0.1:9001", None, None)),
    (None, True, ("unix://{here}/run/supervisor.sock", "alice", "s3cret")),
    # An explicit URL wins; the named file still gives the credentials.
    ("http://10.0.0.1:9001", True, ("http://10.0.0.1:9001", "alice", "s3cret")),
])
def test_find_server_reads_the_config_as_supervisorctl_does(tmp_path, url, use_conf, expected):
    conf = tmp_path / "supervisord.conf"
    conf.write_text(SUPERVISORCTL)
    server = rpc.find_server(url, str(conf) if use_conf else None)
    assert (server.url, server.username, server.password) == tuple(
        e.format(here=tmp_path) if isinstance(e, str) else e for e in expected)


def test_find_server_searches_supervisorctls_default_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "supervisord.conf").write_text(SUPERVISORCTL)
    server = rpc.find_server()
    assert server.url == f"unix://{tmp_path}/run/supervisor.sock" and server.source == "supervisord.conf"


@pytest.mark.parametrize("text, problem", [
    (None, "could not find config file"),
    ("[supervisord]\n", "does not include supervisorctl section"),
])
def test_find_server_bad_config_is_one_error(tmp_path, text, problem):
    conf = tmp_path / "supervisord.conf"
    if text is not None:
        conf.write_text(text)
    with pytest.raises(SupervisorError, match=problem):
        rpc.find_server(None, str(conf))


def test_an_unreachable_supervisord_is_a_supervisor_error(tmp_path):
    server = rpc.Server(f"unix://{tmp_path}/nobody.sock")
    with pytest.raises(SupervisorError, match="not reachable"):
        rpc.all_process_info(server)


# ---------------------------------------------------------- the ping wait


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_wait_answering_records_each_nodes_first_answer():
    """Node a answers the second ping, b (known only from round 2) the third."""
    clock = Clock()
    script = iter([set(), {"a"}, {"b"}])
    asked = []

    def ping(nodes, timeout):
        asked.append(list(nodes))
        clock.now += 0.1
        return next(script) & set(nodes)

    rounds = iter([["a"], ["a", "b"]])
    answered, silent = wait_answering(ping, lambda: next(rounds, ["a", "b"]), 110.0, clock=clock, sleep=clock.sleep)
    assert silent == []
    assert answered == pytest.approx({"a": 100.25, "b": 100.35})
    assert asked == [["a"], ["a", "b"], ["b"]]


def test_wait_answering_gives_up_at_the_deadline():
    clock = Clock()

    def ping(nodes, timeout):
        clock.now += timeout
        return set()

    answered, silent = wait_answering(ping, lambda: ["a"], 101.0, clock=clock, sleep=clock.sleep)
    assert (answered, silent) == ({}, ["a"])
    assert clock.now == pytest.approx(101.0, abs=0.3)


def test_wait_answering_without_a_worker_process_says_so():
    clock = Clock()
    answered, silent = wait_answering(lambda n, t: set(), lambda: [], 100.5, clock=clock, sleep=clock.sleep)
    assert (answered, silent) == ({}, ["(no worker process found)"])


def test_cancel_clock_notes_the_last_cancel_and_passes_calls_through():
    clock = Clock()
    calls = []

    class Remote:
        def cancel_consumer(self, *args):
            calls.append(("cancel", args))
            clock.now += 0.5

        def inspect(self, *args):
            calls.append(("inspect", args))
            return {"n": []}

        def close(self):
            calls.append(("close",))

    cancels = CancelClock(lambda app: Remote(), clock)
    with cancels("app") as remote:
        remote.cancel_consumer("q1", ["n"], 60)
        remote.cancel_consumer("q2", ["n"], 60)
        assert remote.inspect("active", ["n"], 1) == {"n": []}
    assert cancels.sent_at == 101.0
    assert [c[0] for c in calls] == ["cancel", "cancel", "inspect", "close"]


def test_result_consume_gap_is_the_longest_and_problem_means_exit_3():
    result = RestartResult(processes=["w"], consume_gaps={"a@h": 1.5, "b@h": 2.5})
    assert (result.consume_gap, result.exit_code) == (2.5, 0)
    result.problem = "drain timed out"
    assert result.exit_code == 3
    assert RestartResult(processes=[]).consume_gap is None


def test_plain_output_off_a_terminal_and_json():
    import io
    import json

    from celery_supervise import render as report
    from celery_supervise.processes.kill import KillReport
    from celery_supervise.commands.restart import Phase

    result = RestartResult(
        processes=["celery-worker"],
        phases=[Phase("savepid", 0.12, "1 worker(s)"), Phase("drain", 4.5, "1 worker(s) drained"),
                Phase("stop", 2.0), Phase("kill", 0.03, "killed 3"), Phase("start", 1.9), Phase("ready", 1.1)],
        nodes=["demo0@h"], new_nodes={"demo0@h": 1.1}, consume_gaps={"demo0@h": 9.54}, kill=KillReport(),
        stopped=True, started=True,
    )
    out, err = io.StringIO(), io.StringIO()
    assert report.render_restart(*report.consoles(out, err), result, False) == 0
    lines = out.getvalue().splitlines()
    assert lines[1] == "drain       4.50s  1 worker(s) drained"
    assert lines[6] == "total       9.65s"
    assert lines[7] == "consume gap: 9.54s (old workers' cancels sent -> new workers answer a ping)"
    assert len(lines) == 8 and err.getvalue() == ""

    out = io.StringIO()
    report.render_restart(*report.consoles(out, err), result, True)
    doc = json.loads(out.getvalue())
    assert doc["consume_gap"] == 9.54 and doc["total"] == 9.65 and doc["exit_code"] == 0
    assert doc["phases"][0] == {"name": "savepid", "seconds": 0.12, "detail": "1 worker(s)"}
    assert doc["kill"]["summary"]["failed"] == 0 and doc["drain"] is None


def test_side_by_side_runs_the_calls_at_once_in_order_and_raises_the_first_error():
    import threading

    from celery_supervise.commands.restart import side_by_side

    barrier = threading.Barrier(3, timeout=5)  # only passes if all three run at once

    def call(server, name):
        barrier.wait()
        return f"{server}:{name}"

    assert side_by_side(call, "s", ["a", "b", "c"]) == ["s:a", "s:b", "s:c"]

    def fail(server, name):
        if name == "b":
            raise SupervisorError(server, f"startProcess({name}) failed")
        return name

    with pytest.raises(SupervisorError, match=r"startProcess\(b\)"):
        side_by_side(fail, "s", ["a", "b"])


def test_side_by_side_says_how_many_calls_still_run():
    import threading

    from celery_supervise.commands.restart import side_by_side

    release, seen = threading.Event(), []

    def slow(server, name):
        assert release.wait(10)
        return name

    def on_wait(left, elapsed):  # about once a second while a call runs
        seen.append((left, elapsed >= 0.9))
        release.set()

    assert side_by_side(slow, "s", ["a"], on_wait=on_wait) == ["a"]
    assert seen == [(1, True)]
