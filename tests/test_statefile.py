"""Bad state files: one line on stderr, exit 1, no traceback, nothing signalled.

Each case starts from a valid record of a real, live process (the canary)
and spoils it in one way. If the tool acted on it, the canary would die.
"""

import json
import os

import psutil
import pytest

from celery_supervise import plan, procs, snapshot, statefile
from celery_supervise.plan import Policy

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
