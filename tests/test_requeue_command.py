"""``requeue`` on a hand-written record, against the filesystem broker: no worker needed.

The record names a task as savepid would; the broker is a folder, so a
test sees exactly which messages were sent (:func:`sent`). In-process
through :func:`requeue_cmd.requeue` for the rules, and through the real
``celery-supervise`` and ``manage.py celery`` commands for the options,
the output and the exit codes.
"""

import base64
import json
import os
import stat
import subprocess
import sys

import pytest
from celery import Celery
from rich.console import Console

from celery_supervise.celery_side import journal, ledger as ledgers
from celery_supervise import render as report
from celery_supervise.commands import requeue as requeue_cmd
from celery_supervise.processes import snapshot, statefile
from celery_supervise.errors import BrokerError, PartialError, StateFileError, UsageError
from celery_supervise.celery_side.fs_transport import TRANSPORT_PATH, filesystem_broker_options
from celery_supervise.processes.plan import Policy
from celery_supervise.processes.procs import MAIN, Proc
from realsupervisor import BIN, DJANGO_APP

DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1
CELERY = {"exchange": "", "routing_key": "celery", "priority": 0, "redelivered": False}


def reply(id, name="demo.tasks.add", args=(2, 3), kwargs=None, acknowledged=True, delivery_info=CELERY):
    return {"id": id, "name": name, "args": list(args), "kwargs": kwargs or {}, "delivery_info": delivery_info,
            "acknowledged": acknowledged, "worker_pid": 4243, "time_start": 1000.0, "hostname": "demo0@host"}


def write_record(path, *replies, source="control"):
    """A state file as savepid writes it: one worker (never signalled here) running *replies*."""
    main = Proc(pid=4242, ppid=4000, create_time=1.0, pgid=4242, sid=4000, uid=os.geteuid(),
                cmdline=("celery", "-A", "demo", "worker"), sighup_ignored=False, role=MAIN)
    worker = snapshot.Worker(main=main, procs=(main,), node="demo0@host", app="demo",
                             tasks=tuple(snapshot.Task.from_reply(r) for r in replies))
    statefile.write(str(path), statefile.to_document(snapshot.take([worker], source), Policy(), []))
    return str(path)


def write_journal(directory, *events):
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(os.path.join(directory, f"host-1-1{journal.SUFFIX}"), "a") as f:
        for kind, task_id, state in events:
            f.write(json.dumps({"e": kind, "id": task_id, "state": state, "t": 2000.0}) + "\n")


def sent(broker_dir):
    """``{task id: (name, args, kwargs, queue)}`` of the messages in the broker folder."""
    out = {}
    data = os.path.join(broker_dir, "data")
    for name in sorted(os.listdir(data)):
        with open(os.path.join(data, name)) as f:
            message = json.load(f)
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out[message["headers"]["id"]] = (message["headers"]["task"], args, kwargs, name.split(".", 1)[1])
    return out


@pytest.fixture
def broker_dir(tmp_path):
    return str(tmp_path / "broker")


@pytest.fixture
def app(broker_dir):
    app = Celery("requeue-test", set_as_current=False)
    app.conf.update(broker_url="filesystem://", broker_transport=TRANSPORT_PATH,
                    broker_transport_options=filesystem_broker_options(broker_dir), task_ignore_result=True)
    yield app
    app.close()


def statuses(result):
    return {o.decision.task.id: (o.status, o.decision.reason) for o in result.outcomes}


# ------------------------------------------------------------- in process


def test_requeue_sends_the_interrupted_task_once_with_its_id_arguments_and_queue(app, tmp_path, broker_dir):
    state = write_record(tmp_path / "state.json", reply("cut", kwargs={"x": 1}), reply("done"),
                         reply("late", acknowledged=False))
    write_journal(tmp_path / "j", ("started", "cut", None), ("started", "done", None),
                  ("finished", "done", "SUCCESS"))
    result = requeue_cmd.requeue(state, app, journal_dir=str(tmp_path / "j"))
    assert statuses(result) == {
        "cut": ("re-sent", "interrupted (journal: never finished)"),
        "done": ("skipped", "finished (journal: SUCCESS)"),
        # The filesystem transport: a clean shutdown would have put it back in the folder; it is not there.
        "late": ("re-sent", "unacknowledged, but the transport lost it with the worker"),
    }
    assert result.warnings == []
    assert sent(broker_dir) == {"cut": ("demo.tasks.add", [2, 3], {"x": 1}, "celery.msg"),
                                "late": ("demo.tasks.add", [2, 3], {}, "celery.msg")}
    ledger = tmp_path / "state.json.requeued"
    assert set(json.loads(ledger.read_text())["tasks"]) == {"cut", "late"}
    assert stat.S_IMODE(os.stat(ledger).st_mode) == 0o600

    again = requeue_cmd.requeue(state, app, journal_dir=str(tmp_path / "j"))
    assert {k: v[0] for k, v in statuses(again).items()} == {"cut": "skipped", "done": "skipped", "late": "skipped"}
    assert statuses(again)["cut"][1] == "already requeued"
    # Now "late" is in the folder too, so it would not have been re-sent anyway.
    assert len(sent(broker_dir)) == 2


def test_dry_run_sends_nothing_and_writes_no_ledger(app, tmp_path, broker_dir):
    state = write_record(tmp_path / "state.json", reply("cut"))
    result = requeue_cmd.requeue(state, app, dry_run=True, journal_dir=str(tmp_path / "j"))
    assert statuses(result) == {"cut": ("would re-send", "not in the journal (at-least-once)")}
    assert sent(broker_dir) == {} and not os.path.exists(state + ".requeued")


def test_without_a_journal_it_says_at_least_once(app, tmp_path):
    state = write_record(tmp_path / "state.json", reply("cut"), reply("late", acknowledged=False))
    result = requeue_cmd.requeue(state, app, dry_run=True)
    assert result.journal is None
    assert statuses(result)["cut"] == ("would re-send", "no journal (at-least-once)")
    [warning] = result.warnings
    assert warning.startswith("no task journal: 1 task(s) are re-sent at least once: a task that finished between "
                              "savepid and the stop runs again")


def test_the_app_names_its_journal(app, tmp_path):
    write_journal(tmp_path / "j", ("finished", "done", "SUCCESS"))
    journal.install(app, tmp_path / "j")
    state = write_record(tmp_path / "state.json", reply("done"))
    result = requeue_cmd.requeue(state, app, dry_run=True)
    assert result.journal == str(tmp_path / "j")
    assert statuses(result) == {"done": ("skipped", "finished (journal: SUCCESS)")}


def test_a_dead_broker_sends_nothing_and_leaves_the_ledger_alone(tmp_path):
    app = Celery("requeue-dead", set_as_current=False)
    app.conf.broker_url = DEAD_BROKER
    state = write_record(tmp_path / "state.json", reply("cut"))
    with pytest.raises(BrokerError, match="did not answer"):
        requeue_cmd.requeue(state, app)
    assert not os.path.exists(state + ".requeued")
    app.close()


def test_a_broker_failing_midway_exits_3_and_the_rerun_sends_the_rest(app, tmp_path, broker_dir):
    state = write_record(tmp_path / "state.json", reply("a"), reply("b"), reply("c"))
    calls = []

    def flaky(app, conn, decision):
        calls.append(decision.task.id)
        if decision.task.id == "b":
            raise ConnectionResetError("gone")
        requeue_cmd.send_again(app, conn, decision)

    result = requeue_cmd.requeue(state, app, publish=flaky)
    assert {k: v[0] for k, v in statuses(result).items()} == {"a": "re-sent", "b": "failed", "c": "failed"}
    assert calls == ["a", "b"]
    assert result.exit_code == 3
    assert "run requeue again to send the rest" in result.warnings[-1]
    rerun = requeue_cmd.requeue(state, app)
    assert {k: v[0] for k, v in statuses(rerun).items()} == {"a": "skipped", "b": "re-sent", "c": "re-sent"}
    assert set(sent(broker_dir)) == {"a", "b", "c"}


def test_a_ledger_of_an_earlier_record_is_ignored(app, tmp_path):
    state = write_record(tmp_path / "state.json", reply("cut"))
    old = ledgers.Ledger(state + ".requeued", snapshot.hostname(), 1.0, {"cut": {}})
    statefile.write(old.path, old.document(state))
    result = requeue_cmd.requeue(state, app, dry_run=True)
    assert statuses(result)["cut"][0] == "would re-send"


@pytest.mark.parametrize("content, mode, problem", [
    ("{not json", 0o600, "is not a valid requeue ledger"),
    ('{"kind": "something else"}', 0o600, "is not a celery-supervise requeue ledger"),
    ('{}', 0o666, "is group- or world-writable"),
])
def test_a_ledger_that_cannot_be_trusted_is_an_error(app, tmp_path, content, mode, problem):
    state = write_record(tmp_path / "state.json", reply("cut"))
    path = tmp_path / "state.json.requeued"
    path.write_text(content)
    os.chmod(path, mode)
    with pytest.raises(StateFileError, match=problem):
        requeue_cmd.requeue(state, app, dry_run=True)


def test_what_requeue_refuses(app, tmp_path):
    pids = tmp_path / "pids.txt"
    pids.write_text("4242 4243\n")
    os.chmod(pids, 0o600)
    with pytest.raises(StateFileError, match="bare PID list"):
        requeue_cmd.requeue(str(pids), app)
    with pytest.raises(UsageError, match="needs -A APP"):
        requeue_cmd.requeue(str(pids), None)
    state = write_record(tmp_path / "state.json", source="scan")
    result = requeue_cmd.requeue(state, app)
    assert result.outcomes == [] and "nothing to requeue" in result.warnings[0]


def test_the_table(app, tmp_path):
    state = write_record(tmp_path / "state.json", reply("cut"), reply("late", acknowledged=False))
    result = requeue_cmd.requeue(state, app, dry_run=True, journal_dir=str(tmp_path / "j"))
    out, err = Console(record=True, width=200), Console(record=True, width=200)
    assert report.render_requeue(out, err, result, as_json=False) == 0
    text = out.export_text()
    assert "celery-supervise requeue (dry run: nothing sent)" in text
    assert text.splitlines()[-1] == "would re-send 2, skipped 0 of 2 recorded task(s)"
    assert "warning: 1 task(s) are not in the journal" in err.export_text()


# ------------------------------------------------------- the real commands


def environment(tmp_path, **extra):
    return dict(os.environ, CELERY_SUPERVISE_BROKER_DIR=str(tmp_path / "broker"),
                CELERY_SUPERVISE_JOURNAL_DIR=str(tmp_path / "j"), **extra)


def cli(*args, tmp_path, **extra):
    return subprocess.run([str(BIN / "celery-supervise"), "-A", "demo", *args], cwd=DJANGO_APP,
                          env=environment(tmp_path, **extra), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def manage(*args, tmp_path, **extra):
    return subprocess.run([sys.executable, "manage.py", "celery", *args], cwd=DJANGO_APP,
                          env=environment(tmp_path, **extra), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("run", [cli, manage], ids=["cli", "django"])
def test_the_commands_requeue_once_with_the_same_output(run, tmp_path):
    state = write_record(tmp_path / "state.json", reply("cut", kwargs={"x": 1}), reply("done"))
    write_journal(tmp_path / "j", ("started", "cut", None), ("finished", "done", "SUCCESS"))

    dry = run("requeue", state, "--dry-run", "--json", tmp_path=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert {t["id"]: t["status"] for t in json.loads(dry.stdout)["tasks"]} == {"cut": "would re-send",
                                                                                "done": "skipped"}
    assert not os.path.exists(tmp_path / "broker" / "data") or sent(str(tmp_path / "broker")) == {}

    result = run("requeue", state, "--json", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["exit_code"], doc["journal"], doc["ledger"]) == (0, str(tmp_path / "j"), state + ".requeued")
    assert doc["summary"] == {"re-sent": 1, "would re-send": 0, "failed": 0, "skipped": 1}
    [cut] = [t for t in doc["tasks"] if t["id"] == "cut"]
    assert cut["route"] == {"exchange": None, "routing_key": "celery", "queue": "celery", "priority": 0}
    assert sent(str(tmp_path / "broker")) == {"cut": ("demo.tasks.add", [2, 3], {"x": 1}, "celery.msg")}

    again = run("requeue", state, tmp_path=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == "re-sent 0, skipped 2 of 2 recorded task(s)"
    assert "already requeued" in again.stdout
    assert len(sent(str(tmp_path / "broker"))) == 1


@pytest.mark.parametrize("run, prefix", [(cli, "celery-supervise: error: "), (manage, "CommandError: ")],
                         ids=["cli", "django"])
def test_a_dead_broker_is_one_line_and_exit_1(run, prefix, tmp_path):
    state = write_record(tmp_path / "state.json", reply("cut"))
    result = run("requeue", state, tmp_path=tmp_path, CELERY_BROKER_URL=DEAD_BROKER)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(prefix + "broker redis://") and "127.0.0.1:1/0 did not answer" in line, line
    assert result.stdout == "" and not os.path.exists(state + ".requeued")


def test_a_ledger_that_cannot_be_written_after_a_send_says_so_and_exits_3(app, tmp_path, monkeypatch):
    state = write_record(tmp_path / "state.json", reply("cut"))

    real_write, writes = statefile.write, []

    def full_disk(path, document):
        # The first write (the ledger as it was, before any send) still fits.
        writes.append(path)
        if len(writes) > 1:
            raise StateFileError(path, "cannot write: No space left on device")
        real_write(path, document)

    monkeypatch.setattr(statefile, "write", full_disk)
    with pytest.raises(PartialError, match="task cut was re-sent, but the ledger could not record it") as info:
        requeue_cmd.requeue(state, app)
    assert info.value.exit_code == 3
