"""The task journal: what a worker writes, and what requeue reads back.

Tasks run eagerly in pytest (``task.apply()`` fires the same prerun and
postrun signals as a worker's pool process); the e2e tests run the demo
worker with the journal installed.
"""

import json
import os
import stat
import time

import pytest
from celery import Celery

from celery_supervise.celery_side import journal
from celery_supervise.errors import JournalError
from celery_supervise.celery_side.journal import FINISHED, INTERRUPTED, STARTED, Entry, Journal


def lines(directory):
    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            out += [json.loads(line) for line in f]
    return out


@pytest.fixture
def app(tmp_path):
    app = Celery("journal-test", set_as_current=False)
    app.conf.task_always_eager = True

    @app.task(name="t.ok", shared=False)
    def ok():
        return 1

    @app.task(name="t.boom", shared=False)
    def boom():
        raise ValueError("boom")

    @app.task(name="t.cut", shared=False)
    def cut():
        raise SystemExit(1)  # what a cold shutdown's SIGTERM does to a running task

    yield app
    app.close()


def test_install_journals_start_and_finish_with_the_state(app, tmp_path):
    journal.install(app, tmp_path / "j")
    app.tasks["t.ok"].apply(task_id="a")
    app.tasks["t.boom"].apply(task_id="b")
    with pytest.raises(SystemExit):
        app.tasks["t.cut"].apply(task_id="c")
    got = [(e["e"], e["id"], e.get("state")) for e in lines(tmp_path / "j")]
    assert got == [(STARTED, "a", None), (FINISHED, "a", "SUCCESS"), (STARTED, "b", None),
                   (FINISHED, "b", "FAILURE"), (STARTED, "c", None), (INTERRUPTED, "c", None)]
    assert all(e["pid"] == os.getpid() for e in lines(tmp_path / "j"))
    [name] = os.listdir(tmp_path / "j")
    assert stat.S_IMODE(os.stat(tmp_path / "j" / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "j").st_mode) == 0o700
    entries = journal.read(str(tmp_path / "j"), ["a", "b", "c", "nope"])
    assert {k: (v.event, v.state, v.finished) for k, v in entries.items()} == {
        "a": (FINISHED, "SUCCESS", True), "b": (FINISHED, "FAILURE", True), "c": (INTERRUPTED, None, False)}


def test_install_reads_the_setting_and_ignores_other_apps(app, tmp_path):
    app.conf.supervise_journal = str(tmp_path / "j")  # CELERY_SUPERVISE_JOURNAL under Django
    journal.install(app)
    other = Celery("other", set_as_current=False)
    other.conf.task_always_eager = True
    def other_ok():
        return 1

    try:
        other.task(name="o.ok", shared=False)(other_ok).apply(task_id="o")
        app.tasks["t.ok"].apply(task_id="a")
    finally:
        other.close()
    assert {e["id"] for e in lines(tmp_path / "j")} == {"a"}
    assert journal.configured_directory(app) == str(tmp_path / "j")


def test_no_directory_means_no_journal(app, tmp_path):
    j = journal.install(app)
    app.tasks["t.ok"].apply(task_id="a")
    assert j.directory is None and journal.configured_directory(app) is None


def test_a_journal_that_cannot_be_written_never_fails_the_task(app, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    journal.install(app, blocker / "j")  # a folder below a file: cannot exist
    assert app.tasks["t.ok"].apply(task_id="a").get() == 1
    assert app.tasks["t.ok"].apply(task_id="b").get() == 1
    assert len([r for r in caplog.records if "cannot write" in r.message]) == 1  # once per process


def test_the_latest_event_wins_and_torn_or_foreign_lines_are_ignored(tmp_path):
    d = tmp_path / "j"
    d.mkdir(mode=0o700)
    (d / "h-1-1.journal").write_text(
        '{"e":"started","id":"r","t":1}\n{"e":"finished","id":"r","state":"RETRY","t":2}\n'
        '{"e":"started","id":"s","t":1}\n')
    (d / "h-2-2.journal").write_text(
        '{"e":"started","id":"r","t":3}\n'  # the retry runs again (same id) and is cut off
        '{"e":"finished","id":"s","state":"SUCCESS","t":1}\n'  # same instant as its start: finished wins
        'not json\n{"e":"nonsense","id":"x","t":1}\n{"e":"finished","id":"t","st')  # torn last line
    (d / "notes.txt").write_text('{"e":"finished","id":"u","state":"SUCCESS","t":1}\n')
    entries = journal.read(str(d), ["r", "s", "t", "u", "x"])
    assert entries == {"r": Entry("r", STARTED, 3.0), "s": Entry("s", FINISHED, 1.0, "SUCCESS")}


def test_files_last_written_before_since_are_skipped(tmp_path):
    d = tmp_path / "j"
    d.mkdir(mode=0o700)
    old, new = d / "h-1-1.journal", d / "h-2-2.journal"
    old.write_text('{"e":"finished","id":"a","state":"SUCCESS","t":100}\n')
    new.write_text('{"e":"started","id":"b","t":2000}\n')
    os.utime(old, (1000, 1000))
    os.utime(new, (3000, 3000))
    assert set(journal.read(str(d), ["a", "b"], since=2000)) == {"b"}
    assert set(journal.read(str(d), ["a", "b"])) == {"a", "b"}


def test_a_missing_journal_is_empty_and_one_others_can_write_is_refused(tmp_path):
    assert journal.read(str(tmp_path / "missing"), ["a"]) == {}
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(JournalError, match="group- or world-writable"):
        journal.read(str(d), ["a"])


def test_a_symlinked_file_is_not_read(tmp_path):
    d = tmp_path / "j"
    d.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.journal"
    elsewhere.write_text('{"e":"finished","id":"a","state":"SUCCESS","t":1}\n')
    (d / "h-1-1.journal").symlink_to(elsewhere)
    assert journal.read(str(d), ["a"]) == {}


def test_one_file_per_hour_and_old_ones_pruned(tmp_path):
    hour = 3600.0
    now = [time.time() // hour * hour + 10]  # ten seconds into this hour
    d = tmp_path / "j"
    j = Journal(d, retention=2 * hour, clock=lambda: now[0])

    def files():
        return sorted(os.listdir(d))

    j.started("a")
    [first] = files()
    j.finished("a", "SUCCESS")
    assert files() == [first]  # the same hour, the same file
    now[0] += hour
    j.started("b")
    assert len(files()) == 2
    os.utime(d / first, (now[0] - 2 * hour - 1, now[0] - 2 * hour - 1))  # untouched past retention
    now[0] += hour
    j.started("c")  # a new hour: the new file is opened, the stale one pruned
    assert first not in files() and len(files()) == 2
    j.close()
    assert set(journal.read(str(d), ["a", "b", "c"])) == {"b", "c"}


def test_processes_append_whole_lines_to_one_file(tmp_path):
    """A prefork pool: the parent's journal, used by forked children at once."""
    d = tmp_path / "j"
    j = Journal(d)
    j.started("parent")
    children = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:  # what a pool process does: write, many times
            try:
                for i in range(200):
                    j.started(f"child{n}-{i}", "x" * 300)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    j.finished("parent", "SUCCESS")
    j.close()
    [name] = os.listdir(d)
    with open(d / name) as f:
        events = [json.loads(line) for line in f]  # every line whole
    assert len(events) == 2 + 4 * 200
    assert {e["pid"] for e in events} == {os.getpid(), *children}
