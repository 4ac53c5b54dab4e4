"""Bad state files: one line on stderr, exit 1, no traceback, nothing signalled.

Each case starts from a valid record of a real, live process (the canary)
and spoils it in one way. If the tool acted on it, the canary would die.
"""

import json
import os

import psutil
import pytest

from celery_supervise import plan, snapshot, statefile
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
    "before last boot": (lambda doc: {**doc, "boot_time": doc["boot_time"] - 86400}, "before the last boot"),
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
    record = statefile.read(str(good_file), host=snapshot.hostname(), boot_time=psutil.boot_time())
    assert record.snapshot.workers[0].main == canary.main


def test_usage_errors_exit_2(good_file):
    for args in (["kill"], ["kill", str(good_file), "--grace", "-1"], ["kill", str(good_file), "--spare", "x"],
                 ["frobnicate"]):
        res = cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
