"""Bad state files: one line on stderr, exit 1, no traceback, nothing signalled.

Each case starts from a valid record of a real, live process (the canary)
and spoils it in one way. If the tool acted on it, the canary would die.
"""

import json
import os
import re

import psutil
import pytest

from celery_supervise.processes import plan, procs, snapshot, statefile
from celery_supervise.processes.plan import Policy
from celery_supervise.processes.procs import Proc

from test_kill import cli


@pytest.fixture
def canary(real_procs):
    proc = real_procs.spawn(["sleep", "60"], process_group=0)
    return snapshot.read_worker(proc.pid)


def valid_document(worker):
    snap = snapshot.take([worker], "test")
    return statefile.to_document(snap, Policy(), plan.plan([worker], Policy()))


def spoil_main_pid(value):
    def spoil(doc):
        doc["workers"][0]["main"] = value
        doc["workers"][0]["procs"][0]["pid"] = value
        return doc
    return spoil


def set_key(key, value):
    def spoil(doc):
        doc[key] = value
        return doc
    return spoil


def raw(text):
    return lambda doc: text


CASES = {
    "empty": (raw(""), "is empty"),
    "whitespace": (raw("  \n"), "is empty"),
    "truncated": (lambda doc: json.dumps(doc)[:-40], "not valid JSON"),
    "not json": (raw("kill them all"), "not valid JSON"),
    "json but not ours": (raw("[1, 2, 3]"), "not a celery-supervise state file"),
    "unknown schema": (set_key("schema", 99), "unknown schema version 99"),
    "other host": (set_key("host", "elsewhere.example"), "was written on host 'elsewhere.example'"),
    "before last boot": (set_key("boot_id", "00000000-0000-0000-0000-000000000000"), "before the last boot"),
    "before last boot, no boot id": (lambda doc: {**{k: v for k, v in doc.items() if k != "boot_id"},
                                                  "boot_time": doc["boot_time"] - 86400}, "before the last boot"),
    "boot id not a string": (set_key("boot_id", 42), "boot_id: 42 is not a string"),
    "pid 1": (spoil_main_pid(1), "names PID 1"),
    "pid 0": (spoil_main_pid(0), "is not positive"),
    "negative pid": (spoil_main_pid(-5), "is not positive"),
    "string pid": (spoil_main_pid("123"), "is not a number"),
    "float pid": (spoil_main_pid(12.5), "is not a number"),
    "legacy pid 1": (raw("1\n"), "names PID 1"),
    "legacy pid 0": (raw("0 42"), "is not positive"),
    "legacy garbage": (raw("12 abc"), "not valid JSON"),
    "bad role": (lambda doc: (doc["workers"][0]["procs"][0].update(role="boss"), doc)[1], "unknown role"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_content_is_refused(case, canary, tmp_path):
    spoil, message = CASES[case]
    content = spoil(valid_document(canary))
    path = tmp_path / "state.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    os.chmod(path, 0o600)
    assert_refused(path, message, canary)


def assert_refused(path, message, canary):
    res = cli("kill", str(path), "--grace", "0")
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("celery-supervise: error: ")
    assert message in lines[0]
    assert res.stdout == ""
    assert psutil.Process(canary.main.pid).status() != psutil.STATUS_ZOMBIE


@pytest.fixture
def good_file(canary, tmp_path):
    path = tmp_path / "state.json"
    statefile.write(str(path), valid_document(canary))
    return path


def test_missing_file(canary, tmp_path):
    assert_refused(tmp_path / "nope.json", "no such file", canary)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_group_or_world_writable(good_file, canary, mode):
    os.chmod(good_file, mode)
    assert_refused(good_file, "group- or world-writable", canary)


def test_owned_by_another_user(good_file, canary):
    os.chown(good_file, 65534, 65534)
    assert_refused(good_file, "owned by uid 65534, not root", canary)


def test_symlink(good_file, canary, tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(good_file)
    assert_refused(link, "symbolic link", canary)


def test_written_file_is_private_and_readable(good_file, canary):
    assert os.stat(good_file).st_mode & 0o777 == 0o600
    record = statefile.read(str(good_file), host=snapshot.hostname(), boot_time=procs.boot_time(),
                            boot_id=procs.boot_id())
    assert record.snapshot.workers[0].main == canary.main
    assert record.snapshot.boot_id == procs.boot_id() and record.rebased_by == 0


def test_creation_times_are_rebased_to_the_readers_boot_time(good_file, canary):
    """The clock was set between write and read: btime moved, the identities move with it.

    The real clock jump is in test_faults.py; here the reader's boot time is
    simply given as another.
    """
    record = statefile.read(str(good_file), host=snapshot.hostname(), boot_time=procs.boot_time() + 30,
                            boot_id=procs.boot_id())
    (main,) = record.snapshot.workers[0].procs
    assert record.rebased_by == 30
    assert abs(main.create_time - (canary.main.create_time + 30)) < 1e-6
    assert record.verdicts[0]["create_time"] == main.create_time


def test_a_file_without_boot_id_is_read_under_the_old_rule(good_file, canary):
    """Files written before boot ids were recorded: the boot time must agree within the tolerance."""
    doc = json.loads(good_file.read_text())
    del doc["boot_id"]
    good_file.write_text(json.dumps(doc))
    near = statefile.read(str(good_file), host=snapshot.hostname(), boot_time=procs.boot_time() + 1,
                          boot_id=procs.boot_id())
    assert near.rebased_by == 1 and near.snapshot.boot_id is None
    with pytest.raises(statefile.UnsafeStateError, match="before the last boot"):
        statefile.read(str(good_file), host=snapshot.hostname(), boot_time=procs.boot_time() + 30,
                       boot_id=procs.boot_id())


def test_usage_errors_exit_2(good_file):
    for args in (["kill"], ["kill", str(good_file), "--grace", "-1"], ["kill", str(good_file), "--spare", "x"],
                 ["frobnicate"]):
        res = cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


# ------------------------------------------------- supervisord as PID 1 (containers)

BOOT = 1_700_000_000.0
SUPERVISORD_STARTED = BOOT + 5.0


def init(*cmdline, started=SUPERVISORD_STARTED):
    """PID 1 as the reader sees it, running *cmdline*."""
    return Proc(pid=1, ppid=0, create_time=started, pgid=1, sid=1, uid=0, cmdline=cmdline, sighup_ignored=False)


SUPERVISORD = init("/usr/bin/python3", "/usr/local/bin/supervisord", "-n", "-c", "/etc/supervisor/supervisord.conf")


def container_record(supervisor_pid=1, listener_identity=None):
    """A record written inside a container whose PID 1 is supervisord (by savepid, or the listener).

    PID 1 supervisord
    └── 7 celery worker (main)       the worker the record is about
        └── 8 pool
    """
    main = Proc(pid=7, ppid=1, create_time=BOOT + 9, pgid=7, sid=1, uid=0, cmdline=("celery", "worker"),
                sighup_ignored=False, role="main")
    pool = Proc(pid=8, ppid=7, create_time=BOOT + 10, pgid=7, sid=1, uid=0, cmdline=("celery", "worker"),
                sighup_ignored=False, role="pool")
    worker = snapshot.Worker(main=main, procs=(main, pool), supervisor_pid=supervisor_pid)
    snap = snapshot.Snapshot(host="pod-0", boot_time=BOOT, taken_at=BOOT + 60, workers=(worker,), source="test",
                             boot_id="b0")
    doc = statefile.to_document(snap, Policy(), plan.plan([worker], Policy()))
    if listener_identity is not None:
        doc["supervisor"] = {"pid": listener_identity[0], "create_time": listener_identity[1]}
    return doc


def parse(doc, pid1):
    return statefile.parse("state.json", json.loads(json.dumps(doc)), host="pod-0", boot_time=BOOT, boot_id="b0",
                           init=pid1)


# (record, PID 1 as the reader sees it, the error or None)
PID1_CASES = {
    "savepid, supervisord is PID 1": (container_record(), SUPERVISORD, None),
    "savepid, supervisord run as python -m": (
        container_record(), init("python3", "-m", "supervisor.supervisord", "-n"), None),
    "listener, the same supervisord": (container_record(listener_identity=(1, SUPERVISORD_STARTED)), SUPERVISORD, None),
    "listener, another container's supervisord": (
        container_record(listener_identity=(1, SUPERVISORD_STARTED)), init(*SUPERVISORD.cmdline, started=BOOT + 500),
        "the supervisord that is PID 1 here is another one"),
    "listener identity alone names PID 1, PID 1 is tini": (
        container_record(supervisor_pid=None, listener_identity=(1, SUPERVISORD_STARTED)),
        init("tini", "--", "supervisord", "-n"), "supervisor.pid: names PID 1 as its supervisord, but PID 1 here runs 'tini'"),
    "PID 1 is tini (supervisord below it)": (
        container_record(), init("/usr/bin/tini", "--", "supervisord", "-n"),
        "workers[0].supervisor_pid: names PID 1 as its supervisord, but PID 1 here runs 'tini', not supervisord"),
    "PID 1 is systemd (the record came from a container)": (
        container_record(), init("/sbin/init"), "PID 1 here runs 'init', not supervisord"),
    "PID 1 cannot be read": (container_record(), None, "PID 1 here cannot be read"),
    "tini below supervisord is not PID 1's business": (container_record(supervisor_pid=2), init("tini", "--"), None),
    "supervisor_pid true": (container_record(supervisor_pid=True), SUPERVISORD, "PID True is not a number"),
    "supervisor_pid 1.0": (container_record(supervisor_pid=1.0), SUPERVISORD, "PID 1.0 is not a number"),
}


@pytest.mark.parametrize("case", list(PID1_CASES), ids=list(PID1_CASES))
def test_pid_1_as_the_records_supervisord(case):
    doc, pid1, error = PID1_CASES[case]
    if error is not None:
        with pytest.raises(statefile.StateFileError, match=re.escape(error)):
            parse(doc, pid1)
        return
    record = parse(doc, pid1)
    [worker] = record.snapshot.workers
    assert worker.supervisor_pid == doc["workers"][0]["supervisor_pid"]
    assert [p.pid for p in worker.procs] == [7, 8]
    if "supervisor" in doc:
        assert record.supervisor == (1, SUPERVISORD_STARTED)


def test_pid_1_is_still_never_a_process_of_the_record():
    """Naming PID 1 as a worker's process stays refused, supervisord or not."""
    doc = container_record()
    doc["workers"][0]["procs"][1]["pid"] = 1
    with pytest.raises(statefile.UnsafeStateError, match="procs\\[1\\]: names PID 1; refusing"):
        parse(doc, SUPERVISORD)
