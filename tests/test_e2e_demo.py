"""scripts/demo.sh, the README's one-command demo, run the way a user runs it.

It runs on a copy of the repository's ``conf/``, ``scripts/`` and
``django_app/`` in a temp dir, so its ``var/`` (socket, logs, broker) is
not the repository's, and from another directory: the paths in
``conf/supervisord.conf`` are relative to the file, not to the cwd.
"""

import os
import re
import shutil
import subprocess

import pytest

from realprocs import describe, marked_processes
from realsupervisor import BIN, REPO, copy_project
from taskfamily import ATTACHED, DETACHED

pytestmark = pytest.mark.e2e

DEMO_TIMEOUT = 110  # under pytest's 120 s; the demo takes about 30 s


@pytest.fixture
def repo_copy(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "conf", repo / "conf")
    shutil.copytree(REPO / "scripts", repo / "scripts")
    copy_project(repo / "django_app")
    return repo


def test_demo_shows_what_was_killed_and_spared_and_leaves_nothing_running(repo_copy, tmp_path, test_run_id):
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "CELERY_SUPERVISE_BROKER_DIR")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # as the README's PATH="$PWD/.venv/bin:$PATH"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = subprocess.run(
        [str(repo_copy / "scripts" / "demo.sh")],
        cwd=elsewhere, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DEMO_TIMEOUT,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    out = result.stdout
    for heading in ("1. starting supervisord -c conf/supervisord.conf",
                    "2. waiting for the Celery worker to answer a ping",
                    "3. two tasks, each starting plain, nohup'd and setsid'd children",
                    "4. the tree, as celery-supervise sees it: celery-supervise -A demo status",
                    "5. the deploy: scripts/deploy.sh -c conf/supervisord.conf -A demo -g 5",
                    "6. what became of the tasks' children",
                    "cleaning up: supervisord and the demo processes still alive",
                    "done: nothing of the demo is left running"):
        assert f"==> {heading}" in out, output
    assert "spare own session" in out and "spare nohup" in out  # the status tree's verdicts
    assert "deploy.sh: 4/4 starting supervisord" in result.stderr, output

    # Every child, by kind, dead or alive as it should be.
    children = re.findall(r"^  (dead|alive) +(\w+) +PID (\d+) .*\[ok\]$", out, re.M)
    assert sorted((state, kind) for state, kind, _ in children) == sorted(
        [("dead", kind) for kind in ATTACHED] * 2 + [("alive", kind) for kind in DETACHED] * 2
    ), output
    assert "as expected: 6 attached children killed, 6 detached ones spared" in out
    [cleaned] = re.findall(r"^killing the demo processes still alive, by PID: (.*)$", out, re.M)
    assert sorted(int(pid) for pid in re.findall(r"\d+", cleaned)) == \
        sorted(int(pid) for state, _, pid in children if state == "alive")

    # Nothing left behind: the demo waits for every process it stops, and
    # they all carry this run's marker in their environment.
    left = marked_processes(test_run_id, exclude={os.getpid()})
    assert left == [], describe(left)
    assert not (repo_copy / "var" / "supervisor.sock").exists()
