"""``deploy``'s plain parts: the plan's checks, what became of each task, exit codes, the summary.

The phases themselves run against a real supervisord and worker in
``tests/test_e2e_deploy_command.py``.
"""

import pytest

from celery_supervise.commands import requeue as requeue_cmd
from celery_supervise.celery_side import requeue as requeuing
from celery_supervise.commands.deploy import (
    ALREADY, CANNOT, CUT_OFF, FINISHED, REDELIVERED, RUNNING, UNKNOWN, DeployResult, Options, TaskFate, fate_of,
    plan)
from celery_supervise.errors import StateFileError, SupervisorError, UsageError
from celery_supervise.render import DeployProgress, consoles, deploy_tasks_lines
from celery_supervise.supervisord.rpc import Server
from celery_supervise.processes.snapshot import Task

HOST = """\
[unix_http_server]
file=%(here)s/supervisor.sock

[supervisord]
logfile=%(here)s/{logdir}/supervisord.log
pidfile=%(here)s/supervisord.pid
nodaemon={nodaemon}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(here)s/supervisor.sock
"""


def conf(tmp_path, nodaemon="false", logdir="."):
    path = tmp_path / "supervisord.conf"
    path.write_text(HOST.format(nodaemon=nodaemon, logdir=logdir))
    return str(path)


def found(url, config):
    return Server(url or "unix:///from/the/config.sock", source=config or "--supervisor-url")


@pytest.mark.parametrize("options, error, message", [
    (dict(app_spec=None), UsageError, "deploy needs -A APP"),
    (dict(grace=-1), UsageError, "--grace must not be negative"),
    (dict(shutdown_timeout=0), UsageError, "must be positive"),
    (dict(journal="/j"), UsageError, "--journal is what --requeue reads"),
    (dict(configuration=None), UsageError, "pass -c CONF"),
    (dict(configuration="/nonexistent.conf"), SupervisorError, "cannot read supervisord configuration /nonexistent.conf"),
    (dict(state="/nonexistent/state.json"), StateFileError, "its folder does not exist"),
    (dict(configuration=None, start=False), UsageError, "needs -c CONF or --supervisor-url"),
], ids=["no app", "grace", "shutdown timeout", "journal alone", "no config", "unreadable config", "state folder",
        "nowhere to shut down"])
def test_plan_refuses_before_anything_is_done(tmp_path, options, error, message):
    options = {"app_spec": "demo", "configuration": conf(tmp_path), **options}
    with pytest.raises(error, match=message):
        plan(Options(**options), find_server=found)


def test_plan_reads_the_config_supervisord_will_be_started_with(tmp_path):
    with pytest.raises(SupervisorError, match="sets nodaemon=true, so `supervisord -c` would never return"):
        plan(Options("demo", configuration=conf(tmp_path, nodaemon="true")), find_server=found)
    with pytest.raises(SupervisorError, match="supervisord would not start with it: .*missing"):
        plan(Options("demo", configuration=conf(tmp_path, logdir="missing")), find_server=found)
    # Not starting it again, or only restarting its programs: the file only says where it listens.
    assert plan(Options("demo", configuration=conf(tmp_path, nodaemon="true"), start=False),
                find_server=found).supervisord is None
    assert plan(Options("demo", configuration=conf(tmp_path, nodaemon="true"), shutdown=False),
                find_server=found).supervisord is None


def test_plan_without_a_config(tmp_path):
    p = plan(Options("demo", supervisor_url="http://127.0.0.1:9001", start=False), find_server=found)
    assert p.server.url == "http://127.0.0.1:9001" and p.steps == 3
    p = plan(Options("demo", shutdown=False, requeue=True), find_server=found)  # supervisorctl's own search
    assert p.server.url == "unix:///from/the/config.sock" and p.steps == 5
    p = plan(Options("demo", configuration=conf(tmp_path)), find_server=found)
    assert p.supervisord.endswith("supervisord") and p.steps == 4


# ------------------------------------------------------------------- fates


def outcome(reason, status, action=requeuing.RESEND):
    task = Task(id="t1", name="proj.render", args=[], kwargs={}, delivery_info={"routing_key": "celery"})
    decision = requeuing.Decision(requeuing.Recorded(task, "w@host", 1000), action, reason)
    return requeue_cmd.RequeueOutcome(decision, status)


@pytest.mark.parametrize("reason, status, fate, left", [
    ("finished (journal: SUCCESS)", requeue_cmd.SKIPPED, FINISHED, False),
    ("finished (journal: FAILURE)", requeue_cmd.SKIPPED, FINISHED, False),
    (requeuing.INTERRUPTED, requeue_cmd.WOULD_RESEND, CUT_OFF, True),
    (requeuing.TERMINATED, requeue_cmd.RESENT, CUT_OFF, False),
    (requeuing.LOST_UNACKED, requeue_cmd.FAILED, CUT_OFF, True),
    (requeuing.NO_JOURNAL, requeue_cmd.WOULD_RESEND, UNKNOWN, True),
    (requeuing.NOT_IN_JOURNAL, requeue_cmd.RESENT, UNKNOWN, False),
    (requeuing.REDELIVERED, requeue_cmd.SKIPPED, REDELIVERED, False),
    (requeuing.BACK_IN_QUEUE, requeue_cmd.SKIPPED, REDELIVERED, False),
    ("cannot be re-sent: no task name recorded", requeue_cmd.SKIPPED, CANNOT, False),
    (requeuing.ALREADY_REQUEUED, requeue_cmd.SKIPPED, ALREADY, False),
    (requeuing.DUPLICATE, requeue_cmd.SKIPPED, ALREADY, False),
])
def test_what_became_of_a_recorded_task(reason, status, fate, left):
    t = fate_of(outcome(reason, status))
    assert (t.fate, t.left, t.finished, t.action) == (fate, left, fate == FINISHED, status)
    assert (t.id, t.name, t.node) == ("t1", "proj.render", "w@host")


# ------------------------------------------------------------------ result


def result(**fields):
    r = DeployResult(shutdown=True, dry_run=False, state_file="/tmp/x/state.json", app_spec="proj.celery:app")
    for key, value in fields.items():
        setattr(r, key, value)
    return r


LEFT = TaskFate("t1", "proj.render", "w@host", CUT_OFF, "interrupted (journal: never finished)",
                requeue_cmd.WOULD_RESEND)
DONE = TaskFate("t2", "proj.mail", "w@host", FINISHED, "finished (journal: SUCCESS)", requeue_cmd.SKIPPED)
UNSURE = TaskFate("t3", "proj.sync", "w@host", UNKNOWN, requeuing.NO_JOURNAL, requeue_cmd.RESENT)


@pytest.mark.parametrize("fields, code", [
    (dict(), 0),
    (dict(problems=["savepid failed; nothing was stopped"]), 1),
    (dict(problems=["the new workers did not answer a ping"], changed=True), 3),
    (dict(tasks=[LEFT]), 0),  # a task to re-send is not a failure: the summary says how
])
def test_exit_codes(fields, code):
    assert result(**fields).exit_code == code


def test_the_requeue_command_is_given_only_when_something_is_left_and_the_record_kept():
    assert result(tasks=[LEFT]).requeue_command == "celery-supervise -A proj.celery:app requeue /tmp/x/state.json"
    assert result(tasks=[DONE]).requeue_command is None
    assert result(tasks=[LEFT], kept=False).requeue_command is None
    doc = result(tasks=[LEFT, DONE], changed=True).to_document()
    assert doc["tasks"][0] == {"id": "t1", "name": "proj.render", "node": "w@host", "fate": "cut off",
                               "reason": "interrupted (journal: never finished)", "action": "would re-send",
                               "left_to_resend": True}
    assert doc["state_file"] == "/tmp/x/state.json" and doc["exit_code"] == 0


class Saved:
    snapshot = None


@pytest.mark.parametrize("fields, lines", [
    (dict(tasks=[]), ["tasks: none was running at savepid"]),
    (dict(tasks=[DONE]), ["tasks: 1 running at savepid; finished since: 1; did not finish: 0"]),
    (dict(tasks=[LEFT, DONE, UNSURE]), [
        "tasks: 3 running at savepid; finished since: 1; did not finish: 1; unknown: 1:",
        "  cut off           t1 proj.render (w@host): interrupted (journal: never finished) [would re-send]",
        "  unknown           t3 proj.sync (w@host): no journal (at-least-once) [re-sent]",
        "re-send them with: celery-supervise -A proj.celery:app requeue /tmp/x/state.json"]),
    (dict(tasks=[TaskFate("t1", "proj.render", None, RUNNING, "running at savepid: a stop may cut it off")],
          dry_run=True), [
        "tasks: 1 running now (a stop may cut them off):",
        "  running           t1 proj.render (?): running at savepid: a stop may cut it off"]),
])
def test_the_summary_names_every_task_that_did_not_finish(fields, lines):
    assert deploy_tasks_lines(result(save=Saved(), **fields)) == lines


def test_progress_says_how_long_a_wait_has_lasted_every_five_seconds(capsys):
    _, err = consoles()
    progress = DeployProgress(err, "deploy.sh")
    progress.step(2, 4, "supervisorctl shutdown (supervisord PID 42)")
    for tenth in range(0, 121):
        progress.waiting("for supervisord to exit", tenth / 10, 120)
    for second in range(0, 7):  # a wait of its own, with a count that changes
        progress.waiting(f"for {3 - second // 3} process(es) to stop", second, None)
    assert capsys.readouterr().err.splitlines() == [
        "deploy.sh: 2/4 supervisorctl shutdown (supervisord PID 42)",
        "deploy.sh:    waiting for supervisord to exit: 5s of 120s",
        "deploy.sh:    waiting for supervisord to exit: 10s of 120s",
        "deploy.sh:    waiting for 2 process(es) to stop: 5s",
    ]
