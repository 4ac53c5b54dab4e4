"""conf/supervisord.conf, the example config shipped for the demo, as supervisord reads it."""

import shutil
import signal
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

CONF = Path(__file__).resolve().parent.parent / "conf" / "supervisord.conf"


@pytest.fixture
def worker_config(tmp_path):
    """The celery-worker program's config, read from a copy of conf/ in tmp_path.

    A copy, because supervisord insists that the var/ folder of its log file
    exists, and the tests must not create it in the repository.
    """
    (tmp_path / "conf").mkdir()
    (tmp_path / "var").mkdir()
    conf = shutil.copy(CONF, tmp_path / "conf")
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    [group] = [g for g in options.process_group_configs if g.name == "celery-worker"]
    [program] = group.process_configs
    return tmp_path, options, program


@pytest.fixture
def listener_config(worker_config):
    """The celery-supervise eventlistener's pool config, from the same copy."""
    root, options, _ = worker_config
    [pool] = [g for g in options.process_group_configs if g.name == "celery-supervise"]
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

    assert listener.command.startswith("celery-supervise -A demo listener ")
    assert f"--state-dir {root}/conf/../var/celery-supervise" in listener.command
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
