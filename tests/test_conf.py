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
    [group] = options.process_group_configs
    [program] = group.process_configs
    return tmp_path, options, program


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
