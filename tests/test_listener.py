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

from celery_supervise.processes import procs, snapshot, statefile
from celery_supervise.listener import Listener, parse_payload
from celery_supervise.processes.plan import Policy, plan

from test_refusals import spawn_witness  # noqa: F401 (a fixture)


def make_listener(tmp_path, stdin=""):
    state = tmp_path / "state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Listener(state_dir=str(state), grace=1, stdin=io.StringIO(stdin), stdout=io.StringIO(),
                    stderr=io.StringIO(), clock=lambda: 1000.0, wait=False)


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


# ------------------------------------------------------------------ regressions and seams


def make_worker_tree(tmp_path, real_procs):
    """``sh`` (its own process group, like a supervisord program) -> ``sleep``; returns both.

    The ``sh`` outlives its child: it then becomes a ``sleep`` itself.
    """
    from realprocs import wait_for

    kid_file = tmp_path / "kid"
    script = f"sleep 60 & echo $! > {kid_file}.tmp && mv {kid_file}.tmp {kid_file}; wait; exec sleep 60"
    main = real_procs.spawn(["sh", "-c", script], process_group=0)
    kid = int(wait_for(lambda: kid_file.exists() and kid_file.read_text().strip(), 10, "kid pid"))
    [kid] = real_procs.track(kid)
    return main, kid


def gone(proc):
    return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def test_starting_event_without_pid_is_not_malformed(tmp_path):
    """Regression: STARTING/BACKOFF/FATAL carry no pid, and were logged as malformed (KeyError 'pid')."""
    listener = make_listener(tmp_path)
    for event, payload in [("PROCESS_STATE_STARTING", "processname:w groupname:w from_state:STOPPED tries:0"),
                           ("PROCESS_STATE_BACKOFF", "processname:w groupname:w from_state:STARTING tries:1"),
                           ("PROCESS_STATE_FATAL", "processname:w groupname:w from_state:BACKOFF")]:
        listener.handle_event({"eventname": event}, payload)
    assert logged(listener) == []


def test_sigterm_interrupts_only_a_wait_never_a_reap(tmp_path):
    """Stop is no Exception (no ``except Exception`` swallows it) and is raised only while waiting."""
    from celery_supervise.supervisord.protocol import Stop

    assert not issubclass(Stop, Exception)
    listener = make_listener(tmp_path)
    listener._on_term(15, None)  # busy with an event: only remembered
    assert listener.stop_requested
    listener._waiting = True
    with pytest.raises(Stop):
        listener._on_term(15, None)
    with pytest.raises(Stop):  # a wait that would begin after the signal does not begin
        listener._blocking(lambda: pytest.fail("waited after SIGTERM"))


def test_lost_stderr_never_fails_an_action(tmp_path):
    """supervisord SIGKILLed: our stderr pipe is broken, and the log line is simply lost."""

    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    listener = make_listener(tmp_path)
    listener.stderr = Broken()
    listener.handle_event({"eventname": "REMOTE_COMMUNICATION"}, "")


def test_payload_length_counts_bytes(tmp_path):
    """``len`` is in bytes: a non-ASCII program name must not swallow the next event."""
    payload = "processname:wörker groupname:wörker from_state:STOPPING pid:999999".encode()
    raw = (f"ver:3.0 server:supervisor serial:1 pool:cs poolserial:1 eventname:PROCESS_STATE_STOPPED "
           f"len:{len(payload)}\n").encode() + payload + frame("TICK_60", "when:1").encode()
    listener = make_listener(tmp_path)
    listener.stdin = io.TextIOWrapper(io.BytesIO(raw))
    listener._input = listener.stdin.buffer
    assert listener.run() == 0
    assert listener.stdout.getvalue() == "READY\n" + "RESULT 2\nOKREADY\n" * 2
    assert [line["action"] for line in logged(listener)] == ["exit"]


def test_worker_exit_is_reaped_while_waiting_for_the_next_event(tmp_path, real_procs):
    """The pidfd of a recorded worker wakes the wait: the reap does not wait for supervisord's event."""
    import threading

    from realprocs import wait_for

    main, kid = make_worker_tree(tmp_path, real_procs)
    listener = make_listener(tmp_path)
    listener.record("w", main.pid, "test")
    read_end, write_end = os.pipe()
    listener._input = os.fdopen(read_end, "rb")
    listener.wait = True

    def event_after_the_reap():
        try:
            wait_for(lambda: '"reaped"' in listener.stderr.getvalue(), 10, "the reap")
        finally:
            os.write(write_end, b"x")  # only now does stdin become readable
            os.close(write_end)

    feeder = threading.Thread(target=event_after_the_reap)
    feeder.start()
    main.kill()
    try:
        listener.wait_for_input()
    finally:
        feeder.join()
        listener._input.close()
    (line,) = [entry for entry in logged(listener) if entry["action"] == "reaped"]
    assert line["why"] == "worker exited" and line["killed"] == [kid.pid]
    assert gone(kid)


def test_a_record_never_forgets_a_live_process(tmp_path, real_procs):
    """A child re-parented out of the tree (its parent died) stays in the worker's record.

    ::

        main sh             alive (waits, then execs sleep)
        └── mid sh          killed by the test
            └── kid sleep   re-parented to init: no longer below main
    """
    from realprocs import wait_for

    script = ('sh -c \'sleep 60 & echo $! > kid.tmp && mv kid.tmp kid; wait\' & '
              'echo $! > mid.tmp && mv mid.tmp mid; wait; exec sleep 60')
    main = real_procs.spawn(["sh", "-c", script], process_group=0, cwd=tmp_path)
    mid, kid = (int(wait_for(lambda: (tmp_path / n).exists() and (tmp_path / n).read_text().strip(), 10, n))
                for n in ("mid", "kid"))
    [mid, kid] = real_procs.track(mid, kid)
    listener = make_listener(tmp_path)
    listener.record("w", main.pid, "test")
    mid.kill()
    wait_for(lambda: kid.ppid() != mid.pid, 10, "kid to be re-parented")
    listener.record("w", main.pid, "tick")  # a rewrite, as on a tick or STOPPING
    rec = statefile.read(listener.record_path("w", main.pid), host=snapshot.hostname(), boot_time=procs.boot_time(), boot_id=procs.boot_id())
    assert kid.pid in {p.pid for p in rec.snapshot.workers[0].procs}
    assert kid.pid not in {p.pid for p in snapshot.read_worker(main.pid).procs}


def test_a_live_worker_of_another_live_supervisord_is_never_touched(tmp_path, real_procs):
    """Two supervisords sharing a state folder: a new start replaces only our own old worker."""
    from celery_supervise.processes.procs import Identity

    main, kid = make_worker_tree(tmp_path, real_procs)
    other = real_procs.spawn(["sleep", "60"])  # stands for the other, live, supervisord
    listener = make_listener(tmp_path)
    listener.supervisor = Identity.of(other.pid)
    listener.record("w", main.pid, "test")
    listener.supervisor = Identity.of(os.getpid())  # we are another supervisord's listener
    listener.settle(listener.records("w"), "replaced by a new start", replaced=True)
    listener.sweep("test")
    assert not gone(main) and not gone(kid)
    assert [line["action"] for line in logged(listener)] == ["recorded"]


def test_sweep_warm_stops_a_worker_whose_supervisord_died(tmp_path, real_procs):
    """An orphan (alive, its supervisord dead): TERM to the main, then the kill of its tree."""
    from celery_supervise.processes.procs import Identity

    main, kid = make_worker_tree(tmp_path, real_procs)
    dead = real_procs.spawn(["sleep", "60"])
    listener = make_listener(tmp_path)
    listener.supervisor = Identity.of(dead.pid)
    listener.record("w", main.pid, "test")
    dead.kill()
    dead.wait(10)
    listener.supervisor = None
    listener.sweep("test")
    actions = [line["action"] for line in logged(listener)]
    assert actions == ["recorded", "warm-stop", "reaped"]
    (line,) = [entry for entry in logged(listener) if entry["action"] == "reaped"]
    assert line["why"] == f"test: orphaned (its supervisord {dead.pid} is gone)"
    assert gone(main) and gone(kid)
    assert listener.records() == []


def test_refresh_rewrites_a_record_only_when_a_process_appeared(tmp_path, real_procs):
    main, kid = make_worker_tree(tmp_path, real_procs)
    listener = make_listener(tmp_path)
    listener.record("w", main.pid, "test")
    path = listener.record_path("w", main.pid)
    listener.refresh_changed()  # nothing new
    # As if the kid had been born after the record was written:
    real = listener._last[path]
    listener._last[path] = snapshot.Worker(main=real.main, procs=real.procs[:1], program="w")
    listener.refresh_changed()
    kid.kill()
    kid.wait(10)
    listener.refresh_changed()  # one died, none appeared: the record stays as it is
    assert not gone(main)
    assert [(line["action"], line["why"], line["processes"]) for line in logged(listener)] == [
        ("recorded", "test", 2), ("recorded", "tree grew", 2)]


def test_each_program_and_process_has_its_own_record(tmp_path, real_procs):
    """Several programs (and numprocs>1): a stop event reaps only its own process's record."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_kid = make_worker_tree(tmp_path / "a", real_procs)
    second, second_kid = make_worker_tree(tmp_path / "b", real_procs)
    listener = make_listener(tmp_path)
    listener.record("celery:celery_0", first.pid, "test")
    listener.record("celery-b:celery-b_0", second.pid, "test")
    assert [os.path.basename(p) for p in listener.records()] == [
        f"celery-b_celery-b_0@{second.pid}.json", f"celery_celery_0@{first.pid}.json"]
    second.kill()
    second.wait(10)
    stopped = "processname:celery_0 groupname:celery from_state:STOPPING pid:{}"
    listener.handle_event({"eventname": "PROCESS_STATE_STOPPED"}, stopped.format(first.pid))
    assert [line["action"] for line in logged(listener)] == ["recorded", "recorded"]  # first still runs
    listener.handle_event({"eventname": "PROCESS_STATE_STOPPED"},
                          f"processname:celery-b_0 groupname:celery-b from_state:STOPPING pid:{second.pid}")
    (line,) = [entry for entry in logged(listener) if entry["action"] == "reaped"]
    assert line["record"] == f"celery-b_celery-b_0@{second.pid}.json" and line["killed"] == [second_kid.pid]
    assert not gone(first) and not gone(first_kid)


def test_idle_refresh_records_a_process_forked_by_a_recorded_one(tmp_path, real_procs):
    """A record never drops a live process: a recorded process forks while the listener idles.

    ::

        bash (main, own group)   recorded; forks a sleep once told, during the idle wait
        └── sleep                born after the record: in the record after one refresh
    """
    import os

    from realprocs import wait_for

    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    main = real_procs.spawn(["bash", "-c", f"read -r _ < {fifo}; sleep 60 & wait"], process_group=0)
    listener = make_listener(tmp_path)
    listener.record("w", main.pid, "test")
    path = listener.record_path("w", main.pid)
    listener.refresh_changed()  # idle, nothing new: the record is not rewritten
    with open(fifo, "w") as f:
        f.write("go\n")
    kids = wait_for(lambda: procs.child_pids(main.pid), 10, "the fork")
    real_procs.track(*kids)
    listener.refresh_changed()
    with open(path) as f:
        recorded = {p["pid"] for w in json.load(f)["workers"] for p in w["procs"]}
    assert recorded == {main.pid, *kids}
    assert [(line["action"], line["why"], line["processes"]) for line in logged(listener)] == [
        ("recorded", "test", 1), ("recorded", "tree grew", 2)]


class _Supervisor:
    def __init__(self, info):
        self.info = info

    def getProcessInfo(self, name):
        if isinstance(self.info, Exception):
            raise self.info
        return self.info


class _Rpc:
    def __init__(self, info):
        self.supervisor = _Supervisor(info)


STARTING = "processname:w groupname:w from_state:STOPPED tries:0"


@pytest.mark.parametrize("info, action", [
    ({"pid": os.getpid()}, None),  # the listener itself: never placed
    ({"pid": 0}, None),  # not running (any more)
    (RuntimeError("SHUTDOWN_STATE"), "warning"),  # a Fault while supervisord shuts down: RUNNING places it late
])
def test_starting_never_places_the_listener_itself_and_survives_rpc_faults(tmp_path, info, action):
    listener = make_listener(tmp_path)
    listener.rpc = _Rpc(info)
    listener.handle_event({"eventname": "PROCESS_STATE_STARTING"}, STARTING)
    assert [e["action"] for e in logged(listener)] == ([action] if action else [])


def test_starting_places_no_process_that_is_not_a_worker(tmp_path, real_procs):
    """Another program of the same supervisord (here a plain sleep) is never put in a worker's cgroup."""
    sleeper = real_procs.spawn(["sleep", "60"])
    listener = make_listener(tmp_path)
    listener.rpc = _Rpc({"pid": sleeper.pid})
    listener.handle_event({"eventname": "PROCESS_STATE_STARTING"}, STARTING)
    assert logged(listener) == []


def test_regression_running_event_naming_pid_1_never_moves_pid_1(tmp_path):
    """A RUNNING event naming PID 1 (malformed or stale) once put PID 1 in a worker's cgroup.

    Whatever worker the walk from PID 1 finds, only supervisord's own child
    is ever placed: PID 1's cgroup, and every other process's, stays put.
    """
    from celery_supervise.processes import cgroups

    before = cgroups.path_of(1)
    listener = make_listener(tmp_path)
    listener.handle_event({"eventname": "PROCESS_STATE_RUNNING"},
                          "processname:x groupname:x from_state:STARTING pid:1")
    assert cgroups.path_of(1) == before
    assert "containment" not in [e["action"] for e in logged(listener)]
    listener.close()


def test_regression_running_event_naming_a_process_supervisord_did_not_start_records_nothing(
        tmp_path, spawn_witness):
    """A RUNNING event naming PID 1, or a worker that is not supervisord's child, once recorded a stranger.

    The listener walked down from the PID the event named and recorded the
    first Celery worker it found there, whoever's it was, under the event's
    program: from PID 1, any worker on the machine. Only supervisord's own
    child is a program's process now; nothing else is read, recorded, or
    (at the program's stop) reaped.
    """
    stranger = spawn_witness(argv0="celery", extra=("-A", "otherproj", "worker"))
    for n, pid in enumerate((1, stranger.pid)):
        # A listener per PID: a second RUNNING of the same program settles the
        # first one's record as "replaced", and a regression would then
        # warm-stop whatever worker it had recorded, here or anywhere on the machine.
        listener = make_listener(tmp_path / str(n))
        listener.handle_event({"eventname": "PROCESS_STATE_RUNNING"},
                              f"processname:x groupname:x from_state:STARTING pid:{pid}")
        listener.handle_event({"eventname": "PROCESS_STATE_STOPPING"},
                              f"processname:x groupname:x from_state:RUNNING pid:{pid}")
        assert listener.records() == [] and not listener.pending
        assert "recorded" not in [e["action"] for e in logged(listener)]
        listener.close()
    stranger.assert_untouched()
