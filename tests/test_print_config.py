"""``print-config``: the snippet's defaults, its escaping, and what supervisord makes of it.

The decisions are tested on plain data (:func:`plan` with the Python and
the folder passed in); the snippet itself is read back by supervisor's own
``ServerOptions``, included from a host config that has its own socket,
logfile and pidfile, which must come out unchanged.
"""

import configparser
import json
import shlex
import signal
import subprocess
import sys

import pytest
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions

from celery_supervise.commands.print_config import (
    HOST_SECTIONS, Request, listener_command, plan, print_config, supervisor_value)
from celery_supervise.errors import UsageError
from realsupervisor import BIN

PYTHON = "/srv/venv/bin/python3"


def sections(request, **kwargs):
    found, warnings = plan(request, executable=kwargs.pop("executable", PYTHON), cwd=kwargs.pop("cwd", "/srv/proj"))
    return {s.name: s.values() for s in found}, warnings


# ---------------------------------------------------------------- escaping


@pytest.mark.parametrize("given, written", [
    ("celery -A proj worker -n w@%h", "celery -A proj worker -n w@%%h"),          # Celery's %h, for Celery
    ("celery worker -n w%(process_num)02d@%h", "celery worker -n w%(process_num)02d@%%h"),  # supervisord's own
    ("%(here)s/../app", "%(here)s/../app"),
    ("%(ENV_HOME)s/app", "%(ENV_HOME)s/app"),
    ("already %%h", "already %%h"),
    ("100%", "100%%"),
    ("a;b#c", "a;b#c"),  # no blank before: not a comment
])
def test_supervisor_value_keeps_what_supervisord_expands_and_doubles_the_rest(given, written):
    assert supervisor_value(given, "--command") == written


@pytest.mark.parametrize("given, message", [
    ("celery worker\n[supervisord]", "control characters"),
    ("celery\tworker", "control characters"),
    ("celery worker ; echo", "starts a comment"),
    ("celery worker # x", "starts a comment"),
    (" celery", "leading or trailing blanks"),
    ("", "empty"),
])
def test_supervisor_value_refuses_what_the_parser_would_cut_or_split(given, message):
    with pytest.raises(UsageError, match=message):
        supervisor_value(given, "--command")


def test_what_supervisord_reads_back_is_what_was_given(tmp_path):
    """The escaping, proven on supervisord's own parser: %h reaches Celery, %(process_num) is expanded."""
    options = host_options(tmp_path, print_config(Request(
        "proj", command="celery -A proj worker -n w%(process_num)02d@%h", numprocs=2)).text)
    [group] = [g for g in options.process_group_configs if g.name == "proj-worker"]
    assert [p.command for p in group.process_configs] == [
        "celery -A proj worker -n w00@%h", "celery -A proj worker -n w01@%h"]


# ---------------------------------------------------------------- defaults


def test_defaults_a_careful_user_expects():
    found, warnings = sections(Request("proj.celery:app"))
    worker, listener = found["program:proj-worker"], found["eventlistener:proj-worker-supervise"]
    assert worker["command"] == "/srv/venv/bin/celery -A proj.celery:app worker -l info -n proj-worker@%%h"
    assert worker["directory"] == "/srv/proj"
    assert "numprocs" not in worker and "process_name" not in worker and "user" not in worker
    assert (worker["stopsignal"], worker["stopasgroup"], worker["killasgroup"]) == ("TERM", "false", "false")
    assert int(worker["stopwaitsecs"]) >= 30
    assert int(listener["priority"]) < int(worker["priority"])  # stopped after the workers on shutdown
    assert shlex.split(listener["command"]) == [
        "/srv/venv/bin/celery-supervise", "-A", "proj.celery:app", "listener", "--program", "proj-worker",
        "--state-dir", "/var/lib/celery-supervise/proj-worker", "--grace", "10"]
    assert listener["directory"] == "/srv/proj"
    assert int(listener["stopwaitsecs"]) > 10 + 2 and int(listener["buffer_size"]) > 10
    assert listener["stdout_logfile"] == "NONE" and "stderr_logfile" not in listener  # AUTO: the host's childlogdir
    assert listener["events"] == "PROCESS_STATE,SUPERVISOR_STATE_CHANGE,TICK_60"
    assert warnings == ["there is no /srv/venv/bin/celery: the command names it anyway (install celery there, "
                        "or pass --command)"]


def test_several_processes_each_get_a_name_and_a_node_name():
    found, _ = sections(Request("proj", numprocs=3, user="www", log_dir="/var/log/proj/"))
    worker, listener = found["program:proj-worker"], found["eventlistener:proj-worker-supervise"]
    assert worker["numprocs"] == "3"
    assert worker["process_name"] == "%(program_name)s_%(process_num)02d"
    assert worker["command"].endswith(" -n proj-worker_%(process_num)02d@%%h")
    assert worker["user"] == listener["user"] == "www"
    assert worker["stdout_logfile"] == "/var/log/proj/%(program_name)s_%(process_num)02d.log"
    assert listener["stderr_logfile"] == "/var/log/proj/proj-worker-supervise.log"
    # the listener matches "group:name", and every process of a numprocs program is "proj-worker:proj-worker_NN"
    assert "--program proj-worker:* " in listener["command"]


def test_a_given_command_without_process_num_for_several_processes_is_warned_about():
    _, warnings = sections(Request("proj", command="celery -A proj worker", numprocs=2))
    assert warnings == ["--numprocs 2, but --command has no %(process_num): every process would have the same "
                        "node name (add e.g. -n name_%(process_num)02d@%h)"]


@pytest.mark.parametrize("command, expected", [
    ("/srv/venv/bin/celery -A proj worker", ["/srv/venv/bin/celery-supervise"]),
    ("celery -A proj worker", ["celery-supervise"]),
    ("%(ENV_VENV)s/bin/celery -A proj worker", ["%(ENV_VENV)s/bin/celery-supervise"]),
    ("/srv/venv/bin/python3 -m celery -A proj worker", ["/srv/venv/bin/python3", "-m", "celery_supervise"]),
    ("/srv/bin/run-worker.sh", ["/opt/tool/bin/celery-supervise"]),
])
def test_the_listener_runs_with_the_workers_python(command, expected):
    assert listener_command(command, "/opt/tool/bin") == expected


@pytest.mark.parametrize("request_, message", [
    (Request(None), "needs -A APP"),
    (Request("proj", program="proj:worker"), "not a plain supervisord program name"),
    (Request("proj", program="proj worker"), "not a plain supervisord program name"),
    (Request("proj", user="bad user"), "not a user name"),
    (Request("proj", directory="/srv/a ;b"), "--directory: a blank followed by"),
    (Request("proj", state_dir="/var/x\n[supervisord]"), "--state-dir: control characters"),
    (Request("proj", numprocs=0), "--numprocs must be at least 1"),
])
def test_bad_options_are_refused(request_, message):
    with pytest.raises(UsageError, match=message):
        plan(request_, executable=PYTHON, cwd="/srv/proj")


# ------------------------------------------- included from a host's config

HOST = """\
[unix_http_server]
file=%(here)s/host.sock
chmod=0700

[supervisord]
logfile=%(here)s/host-supervisord.log
pidfile=%(here)s/host-supervisord.pid
childlogdir=%(here)s/childlogs
loglevel=warn

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(here)s/host.sock

[program:web]
command=/bin/sleep 1000

[include]
files = conf.d/*.conf
"""


def host_options(root, snippet=None):
    """supervisord's own reading of HOST in *root*, with *snippet* in conf.d/ (or nothing there)."""
    (root / "childlogs").mkdir(exist_ok=True)
    (root / "conf.d").mkdir(exist_ok=True)
    for old in (root / "conf.d").glob("*.conf"):
        old.unlink()
    if snippet is not None:
        (root / "conf.d" / "proj.conf").write_text(snippet)
    (root / "supervisord.conf").write_text(HOST)
    options = ServerOptions()
    options.realize(args=["-c", str(root / "supervisord.conf")])
    return options


def host_settings(options):
    """Everything supervisord read into its own [supervisord] settings, and the URL it serves."""
    settings = dict(vars(options.configroot.supervisord))
    del settings["process_group_configs"]
    return settings, options.serverurl, options.logfile, options.pidfile


def test_included_from_a_host_config_it_changes_nothing_of_the_host(tmp_path):
    result = print_config(Request("proj", directory="/srv/proj", numprocs=2, state_dir="/srv/state"),
                          executable=sys.executable)
    before = host_options(tmp_path)
    after = host_options(tmp_path, result.text)

    assert host_settings(after) == host_settings(before)
    assert after.logfile == str(tmp_path / "host-supervisord.log")
    groups = {g.name: g for g in after.process_group_configs}
    assert set(groups) == {"web", "proj-worker", "proj-worker-supervise"}
    assert groups["web"].process_configs[0].command == "/bin/sleep 1000"

    # The program and the listener, as printed.
    printed = {s.name.split(":", 1)[1]: s.values() for s in result.sections}
    for name in ("proj-worker", "proj-worker-supervise"):
        group, values = groups[name], printed[name]
        assert group.priority == int(values["priority"])
        for config in group.process_configs:
            assert config.directory == values["directory"]
            assert config.stopsignal == signal.SIGTERM
            assert config.stopwaitsecs == int(values["stopwaitsecs"])
            assert (config.stopasgroup, config.killasgroup) == (False, False)
            assert config.autorestart is RestartUnconditionally
    workers = groups["proj-worker"].process_configs
    assert [c.name for c in workers] == ["proj-worker_00", "proj-worker_01"]
    assert [shlex.split(c.command)[-1] for c in workers] == [
        f"proj-worker_{n:02d}@%h" for n in (0, 1)]
    assert all(c.redirect_stderr for c in workers)
    [listener] = groups["proj-worker-supervise"].process_configs
    assert listener.command == printed["proj-worker-supervise"]["command"]
    assert groups["proj-worker-supervise"].buffer_size == 50
    assert {e.__name__ for e in groups["proj-worker-supervise"].pool_events} == {
        "ProcessStateEvent", "SupervisorStateChangeEvent", "Tick60Event"}


def test_the_snippet_never_holds_a_host_section():
    text = print_config(Request("proj", numprocs=4, user="www", log_dir="/var/log"), executable=PYTHON).text
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=True)
    parser.read_string(text)
    assert parser.sections() == ["program:proj-worker", "eventlistener:proj-worker-supervise"]
    assert not {s.split(":", 1)[0] for s in parser.sections()} & set(HOST_SECTIONS)
    assert "rpcinterface" not in " ".join(parser.sections())


def test_the_cli_prints_the_snippet_and_its_document(tmp_path):
    def run(*args):
        return subprocess.run([str(BIN / "celery-supervise"), "-A", "proj", "print-config", *args], cwd=tmp_path,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)

    text = run("--numprocs", "2")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("; supervisord programs for the Celery app proj")
    assert f"directory={tmp_path}\n" in text.stdout  # the cwd by default
    assert f"command={BIN}/celery -A proj worker -l info -n proj-worker_%(process_num)02d@%%h\n" in text.stdout
    doc = run("--json")
    assert json.loads(doc.stdout)["sections"]["program:proj-worker"]["stopsignal"] == "TERM"
    bad = run("--program", "a:b")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "celery-supervise: usage: --program: 'a:b' is not a plain supervisord program name" in bad.stderr


@pytest.mark.parametrize("numprocs, size", [(1, 50), (10, 50), (11, 54), (32, 138), (100, 410)])
def test_buffer_size_holds_every_event_of_a_restart_all(numprocs, size):
    """Four state changes per worker (STOPPING, STOPPED, STARTING, RUNNING) + headroom, never below 50."""
    from celery_supervise.commands.print_config import buffer_size_for

    assert buffer_size_for(numprocs) == size
