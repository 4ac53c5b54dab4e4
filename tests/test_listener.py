"""The eventlistener's handler and protocol loop, driven directly.

Streams are plain StringIO objects, as superlance's tests do; no
supervisord is needed to prove that bad input is logged and acknowledged,
never fatal, and never a signal. The behaviour under a real supervisord is
in test_e2e_listener.py.
"""

import io
import json
import os

import psutil
import pytest

from celery_supervise import snapshot, statefile
from celery_supervise.listener import Listener, parse_payload
from celery_supervise.plan import Policy, plan


def make_listener(tmp_path, stdin=""):
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return Listener(state_dir=str(state), grace=1, stdin=io.StringIO(stdin), stdout=io.StringIO(),
                    stderr=io.StringIO(), clock=lambda: 1000.0)


def logged(listener):
    return [json.loads(line) for line in listener.stderr.getvalue().splitlines()]


def frame(eventname, payload):
    header = f"ver:3.0 server:supervisor serial:1 pool:cs poolserial:1 eventname:{eventname} len:{len(payload)}\n"
    return header + payload


MALFORMED = [
    ({}, "", "malformed"),
    ({"eventname": "PROCESS_STATE_RUNNING"}, "garbage", "malformed"),
    ({"eventname": "PROCESS_STATE_RUNNING"}, "a:b:c d", "malformed"),
    ({"eventname": "PROCESS_STATE_STOPPED"}, "processname:x", "malformed"),
    ({"eventname": "PROCESS_STATE_RUNNING"}, "processname:x groupname:x from_state:STARTING pid:abc", None),
    ({"eventname": "PROCESS_STATE_EXITED"}, "processname:x groupname:x from_state:RUNNING expected:0 pid:1", None),
    ({"eventname": "PROCESS_STATE_RUNNING"}, "processname:x groupname:x from_state:STARTING pid:1", None),
    ({"eventname": "REMOTE_COMMUNICATION"}, "type:x\nhello", "ignored"),
    ({"eventname": "TICK_60"}, "when:not-a-number", None),
]


@pytest.mark.parametrize("headers, payload, action", MALFORMED)
def test_bad_events_are_logged_not_fatal(tmp_path, headers, payload, action, real_procs):
    canary = real_procs.spawn(["sleep", "60"])
    listener = make_listener(tmp_path)
    listener.handle_event(headers, payload)
    if action:
        assert [line["action"] for line in logged(listener)] == [action]
    assert listener.stdout.getvalue() == ""  # the handler never writes protocol
    assert canary.is_running() and canary.status() != psutil.STATUS_ZOMBIE


def test_parse_payload():
    assert parse_payload("processname:w groupname:g from_state:RUNNING pid:42") == {
        "processname": "w", "groupname": "g", "from_state": "RUNNING", "pid": "42"}
    with pytest.raises(ValueError):
        parse_payload("no-colon-here")


def test_protocol_loop_acknowledges_everything_and_exits_on_eof(tmp_path):
    events = (
        frame("TICK_60", "when:1")
        + frame("PROCESS_STATE_RUNNING", "garbage")
        + frame("SUPERVISOR_STATE_CHANGE_RUNNING", "")
        + frame("PROCESS_STATE_STOPPED", "processname:w groupname:w from_state:STOPPING pid:999999")
    )
    listener = make_listener(tmp_path, events)
    assert listener.run() == 0
    # stdout carries nothing but the protocol: READY, then RESULT 2 OK per event.
    assert listener.stdout.getvalue() == "READY\n" + "RESULT 2\nOKREADY\n" * 4
    actions = [line["action"] for line in logged(listener)]
    assert actions[-1] == "exit" and "malformed" in actions


def test_broken_header_line_is_acknowledged(tmp_path):
    listener = make_listener(tmp_path, "this is not a header\n")
    assert listener.run() == 0
    assert listener.stdout.getvalue() == "READY\nRESULT 2\nOKREADY\n"
    assert [line["action"] for line in logged(listener)] == ["malformed", "exit"]


def test_untrusted_record_is_set_aside_never_acted_on(tmp_path, real_procs):
    canary = real_procs.spawn(["sleep", "60"], process_group=0)
    worker = snapshot.read_worker(canary.pid)
    listener = make_listener(tmp_path)
    path = os.path.join(listener.state_dir, "celery-worker@1.json")
    statefile.write(path, statefile.to_document(snapshot.take([worker], "t"), Policy(), plan([worker], Policy())))
    os.chmod(path, 0o666)  # somebody could have rewritten it
    listener.sweep("test")
    assert [line["action"] for line in logged(listener)] == ["refused"]
    assert os.path.exists(path + ".invalid") and not os.path.exists(path)
    assert canary.is_running() and canary.status() != psutil.STATUS_ZOMBIE


def test_sweep_reaps_a_dead_worker_and_writes_a_report(tmp_path, real_procs):
    """A recorded worker whose main died: its attached child is killed, the report written."""
    main = real_procs.spawn(["sh", "-c", f"sleep 60 & echo $! > {tmp_path}/kid; wait"], process_group=0)
    from realprocs import wait_for

    kid = wait_for(lambda: (tmp_path / "kid").exists() and (tmp_path / "kid").read_text().strip(), 10, "kid pid")
    kid = int(kid)
    real_procs.track(kid)
    worker = snapshot.read_worker(main.pid)
    listener = make_listener(tmp_path)
    path = os.path.join(listener.state_dir, f"w@{main.pid}.json")
    statefile.write(path, statefile.to_document(snapshot.take([worker], "t"), Policy(), plan([worker], Policy())))
    main.kill()
    main.wait(10)
    listener.sweep("test")
    (line,) = [entry for entry in logged(listener) if entry["action"] == "reaped"]
    assert line["killed"] == [kid]
    assert not os.path.exists(path)
    with open(line["report"]) as f:
        doc = json.load(f)
    assert {p["pid"]: p["status"] for p in doc["processes"]} == {main.pid: "gone", kid: "killed"}
    assert not psutil.pid_exists(kid) or psutil.Process(kid).status() == psutil.STATUS_ZOMBIE
