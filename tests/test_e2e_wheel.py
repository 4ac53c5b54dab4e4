"""The wheel as a user gets it, in a project of the user's own, deployed with nothing of this repository.

The wheel is built from a copy of the repository (so the build leaves
nothing in it), installed with the ``redis`` and ``django`` extras into a
fresh virtualenv in a temp dir, and used from there only: the "user's
project" is a copy of the demo project, every command runs from it with an
environment whose PATH holds that virtualenv and no trace of this one, and
with Redis db 1 (flushed before and after) as the broker. Then, as the
README tells a user:

1. ``celery-supervise -A demo print-config`` (that virtualenv's) prints the
   snippet, which goes into the ``conf.d/`` of a host config with its own
   socket, log and pidfile;
2. that virtualenv's supervisord runs it: the worker and the listener;
3. two tasks leave attached, nohup'd and setsid'd children;
4. ``celery-supervise -A demo deploy -c CONF``: the attached children die,
   the detached ones live, a new supervisord runs a new worker that answers.

It takes about 35 s, 20 to 30 s of it building and installing (pip may use its cache).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from brokers import require
from realprocs import RUN_ENV_VAR, wait_gone
from realsupervisor import REPO, Supervisord, copy_project, host_config
from taskfamily import ATTACHED, DETACHED, alive, start_families

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/1"
PROGRAM = "demo-worker"  # print-config's default for -A demo
INSTALL_TIMEOUT = 300


@pytest.fixture
def redis_db1():
    import redis

    require(REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


def run(*command, cwd, env, timeout=120):
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, command))}: exit {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def user_environment(venv, tmp_path):
    """A login's environment with the virtualenv on PATH: nothing of this repository or its virtualenv."""
    system_path = [d for d in os.environ["PATH"].split(os.pathsep) if d and not d.startswith(str(REPO))
                   and not d.startswith(os.path.dirname(sys.executable))]
    return {
        "PATH": os.pathsep.join([str(venv / "bin"), *system_path]),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_SUPERVISE_JOURNAL_DIR": str(tmp_path / "journal"),
        RUN_ENV_VAR: os.environ[RUN_ENV_VAR],  # the leak guard's mark
    }


def test_the_wheel_in_a_fresh_virtualenv_configures_and_deploys_a_redis_worker(tmp_path, real_procs, redis_db1):
    began = time.monotonic()
    source, dist, venv = tmp_path / "source", tmp_path / "dist", tmp_path / "venv"
    # Hidden folders (.git, .venv, .nox: CI runs nox before this test, and its
    # virtualenvs hold symlinks that copytree cannot copy) are no part of a build.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "var", "build", "dist", "site", "*.egg-info", "__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source, cwd=tmp_path, env=os.environ,
        timeout=INSTALL_TIMEOUT)
    [wheel] = dist.glob("celery_supervise-*.whl")
    # A virtualenv without pip of its own (ensurepip alone takes 12 s here): this pip installs into it.
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=os.environ)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", f"{wheel}[redis,django]",
        cwd=tmp_path, env=os.environ, timeout=INSTALL_TIMEOUT)
    installed = time.monotonic() - began

    project = copy_project(tmp_path / "home" / "project")
    env = user_environment(venv, tmp_path)
    where = run(venv / "bin" / "python", "-c", "import celery_supervise, sys; print(celery_supervise.__file__); "
                "print(sys.path)", cwd=project, env=env).stdout
    assert where.startswith(str(venv / "lib")) and str(REPO) not in where, where

    conf_d, state, logs = tmp_path / "conf.d", tmp_path / "state", tmp_path / "logs"
    conf_d.mkdir()
    logs.mkdir()
    cli = venv / "bin" / "celery-supervise"
    printed = run(cli, "-A", "demo", "print-config", "--state-dir", state, "--log-dir", logs, cwd=project, env=env)
    assert f"command={venv}/bin/celery -A demo worker -l info -n {PROGRAM}@%%h\n" in printed.stdout
    assert f"command={venv}/bin/celery-supervise -A demo listener --program {PROGRAM} " in printed.stdout
    (conf_d / "demo.conf").write_text(printed.stdout)

    sup = Supervisord(tmp_path / "supervisor", config=host_config(f"{conf_d}/*.conf", nodaemon=False),
                      bin_dir=venv / "bin", broker_url=REDIS_URL, project_dir=project)
    sup.env = env  # the user's, not this test run's
    sup.extra_logs += [f"../logs/{PROGRAM}.log", f"../logs/{PROGRAM}-supervise.log"]
    try:
        sup.start()
        sup.wait_ready()
        [old_main_pid] = sup.group_pids(PROGRAM).values()
        [old_main] = real_procs.track(old_main_pid)
        old_pools = real_procs.track(*old_main.children())
        # Tasks that return at once, leaving their children to the deploy.
        families = start_families(sup.celery, real_procs, count=2, hold=0)

        result = run(cli, "-A", "demo", "deploy", "-c", sup.conf_path, "--grace", "5", "--json", cwd=project,
                     env=env, timeout=180)
        doc = json.loads(result.stdout)
        assert doc["exit_code"] == 0 and doc["problem"] is None, result.stdout + result.stderr
        assert [p["name"] for p in doc["phases"]] == ["savepid", "shutdown", "kill", "start", "ready"]
        assert doc["processes"] == [PROGRAM]
        assert list(doc["new_nodes"]) == [f"{PROGRAM}@{socket.gethostname()}"]
        assert doc["tasks"] == [] and doc["state_file"] is None  # none was running: nothing kept

        assert wait_gone([old_main, *old_pools], timeout=5) == []
        assert wait_gone([f.procs[role] for f in families for role in ATTACHED], timeout=5) == []
        assert all(alive(f.procs[role]) for f in families for role in DETACHED)
        daemon = sup.daemon()
        assert daemon is not None and daemon.pid == doc["supervisord"]["new_pid"]
        new_main_pid = sup.proxy().supervisor.getProcessInfo(PROGRAM)["pid"]
        assert new_main_pid != old_main_pid
        [new_main] = real_procs.track(new_main_pid)
        real_procs.track(*new_main.children())
        assert sup.celery.ping() == [f"{PROGRAM}@{socket.gethostname()}"]
    finally:
        sup.stop()
    assert real_procs.reap() == []
    print(f"\nwheel test: built and installed in {installed:.0f}s, {time.monotonic() - began:.0f}s in all")
