"""examples/kubernetes/: its supervisord.conf agrees with conf/'s, and the Pod's grace period covers the stop.

Both configurations are read by supervisord's own ``ServerOptions``, the
example's with the environment its Dockerfile sets. What the container
changes (foreground, logs to the container's output, paths from the
environment) may differ; the settings that decide how a worker is stopped
and cleaned up may not. The flow itself is ``test_e2e_kubernetes.py``.
"""

import shutil
import signal

import pytest
from supervisor.options import ServerOptions

from test_e2e_kubernetes import EXAMPLE, dockerfile_env, pod_spec
from test_conf import CONF

#: What a stop depends on: the same in conf/ and in the example.
WORKER_SETTINGS = ("priority", "autostart", "autorestart", "startsecs", "stopsignal", "stopwaitsecs",
                   "stopasgroup", "killasgroup", "redirect_stderr")
LISTENER_SETTINGS = ("priority", "autostart", "autorestart", "startsecs", "stopsignal", "stopwaitsecs")


def read(conf):
    """supervisord's view of *conf*: its options, the worker, the listener's pool and the listener."""
    options = ServerOptions()  # takes the environment for %(ENV_X)s now
    options.realize(args=["-c", str(conf)])
    groups = {g.name: g for g in options.process_group_configs}
    [worker] = groups["celery-worker"].process_configs
    [listener] = groups["celery-supervise"].process_configs
    return options, worker, groups["celery-supervise"], listener


@pytest.fixture
def configs(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "var").mkdir()
    host = read(shutil.copy(CONF, tmp_path / "conf"))
    env = {**dockerfile_env(), "RUN_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return host, read(EXAMPLE / "supervisord.conf")


def test_the_example_stops_and_cleans_up_as_conf_does(configs):
    (_, worker, pool, listener), (options, c_worker, c_pool, c_listener) = configs
    for name in WORKER_SETTINGS:
        assert getattr(c_worker, name) == getattr(worker, name), name
    for name in LISTENER_SETTINGS:
        assert getattr(c_listener, name) == getattr(listener, name), name
    assert {e.__name__ for e in c_pool.pool_events} == {e.__name__ for e in pool.pool_events}
    assert c_pool.buffer_size == pool.buffer_size
    assert c_worker.command.startswith("celery -A demo worker ")
    assert c_listener.command.startswith("celery-supervise -A demo listener --state-dir ")
    # The container's part: PID 1 in the foreground, the worker's output is the container's.
    assert options.nodaemon is True
    assert c_worker.stdout_logfile == "/dev/stdout" and c_listener.stderr_logfile == "/dev/stderr"


def test_the_grace_period_covers_the_drain_the_stop_and_the_reap(configs):
    """terminationGracePeriodSeconds > --drain-timeout + stopwaitsecs + the listener's --grace + 2 s (docs/containers.md)."""
    _, (_, worker, _, listener) = configs
    prestop, grace_period = pod_spec()
    drain_timeout = float(prestop[prestop.index("--drain-timeout") + 1])
    reap_grace = float(listener.command.split("--grace ")[1].split()[0])
    assert grace_period > drain_timeout + worker.stopwaitsecs + reap_grace + 2
    assert listener.stopwaitsecs > reap_grace  # the listener finishes its reap before supervisord gives up on it
    assert worker.stopsignal == signal.SIGTERM
