"""conf/, the example config shipped for the demo, as supervisord reads it.

``conf/supervisord.conf`` is the host's part (socket, log, pidfile) and
includes ``conf/conf.d/celery.conf``, the worker and the eventlistener as
``celery-supervise print-config`` prints them (``scripts/demo_conf.sh``).
"""

import configparser
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from realsupervisor import BIN, REPO

CONF_DIR = REPO / "conf"
CONF = CONF_DIR / "supervisord.conf"
SNIPPET = CONF_DIR / "conf.d" / "celery.conf"
LISTENER = "celery-worker-supervise"


@pytest.fixture
def worker_config(tmp_path):
    """The celery-worker program's config, read from a copy of conf/ in tmp_path.

    A copy, because supervisord insists that the var/ folder of its log file
    exists, and the tests must not create it in the repository.
    """
    shutil.copytree(CONF_DIR, tmp_path / "conf")
    (tmp_path / "var").mkdir()
    conf = tmp_path / "conf" / "supervisord.conf"
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    [group] = [g for g in options.process_group_configs if g.name == "celery-worker"]
    [program] = group.process_configs
    return tmp_path, options, program


@pytest.fixture
def listener_config(worker_config):
    """The celery-supervise eventlistener's pool config, from the same copy."""
    root, options, _ = worker_config
    [pool] = [g for g in options.process_group_configs if g.name == LISTENER]
    [listener] = pool.process_configs
    return root, pool, listener


def test_runs_the_demo_worker(worker_config):
    root, _, program = worker_config

    assert program.name == "celery-worker"
    assert program.command == "celery -A demo worker -l info -c 2 -n demo@%h"
    assert Path(program.directory).resolve() == root / "django_app"


def test_stops_the_main_process_only_with_a_warm_shutdown(worker_config):
    _, _, program = worker_config

    assert program.stopsignal == signal.SIGTERM
    assert program.stopwaitsecs >= 10  # an idle worker needs ~5 s
    assert program.stopasgroup is False
    assert program.killasgroup is False


def test_keeps_its_files_in_var(worker_config):
    root, options, program = worker_config

    assert Path(options.logfile).resolve() == root / "var" / "supervisord.log"
    assert Path(options.pidfile).resolve() == root / "var" / "supervisord.pid"
    assert Path(program.stdout_logfile).resolve() == root / "var" / "celery-worker.log"
    [server] = options.server_configs
    assert Path(server["file"]).resolve() == root / "var" / "supervisor.sock"


def test_runs_the_listener_on_the_right_events(listener_config, worker_config):
    root, pool, listener = listener_config
    _, _, worker = worker_config

    assert listener.command.startswith("celery-supervise -A demo listener --program celery-worker ")
    args = shlex.split(listener.command)
    assert Path(args[args.index("--state-dir") + 1]).resolve() == root / "var" / "celery-supervise"
    assert Path(listener.directory).resolve() == root / "django_app"
    assert {e.__name__ for e in pool.pool_events} == {
        "ProcessStateEvent", "SupervisorStateChangeEvent", "Tick60Event"}
    assert pool.buffer_size > 10


def test_listener_is_stopped_last_on_shutdown_and_outwaits_its_grace(listener_config, worker_config):
    _, pool, listener = listener_config
    _, _, worker = worker_config

    # supervisord stops in descending priority on shutdown: the worker first,
    # then the listener, which reaps in its SIGTERM path.
    assert pool.priority < worker.priority
    grace = float(listener.command.split("--grace ")[1].split()[0])
    assert listener.stopwaitsecs > grace
    assert listener.stopsignal == signal.SIGTERM


def test_the_snippet_is_what_print_config_prints(tmp_path):
    """Regenerating conf/conf.d/celery.conf gives the committed file, byte for byte."""
    out = tmp_path / "celery.conf"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo_conf.sh"), str(out)], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert out.read_bytes() == SNIPPET.read_bytes(), "run scripts/demo_conf.sh to print it again"


def test_the_host_part_and_the_snippet_keep_to_their_own_sections():
    def sections(path):
        parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=True)
        parser.read(path)
        return parser.sections()

    assert sections(CONF) == ["unix_http_server", "supervisord", "rpcinterface:supervisor", "supervisorctl", "include"]
    assert sections(SNIPPET) == ["program:celery-worker", f"eventlistener:{LISTENER}"]
