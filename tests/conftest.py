"""Fixtures shared by the whole suite, among them the process leak guard.

pytest's environment gets ``CELERY_SUPERVISE_TEST_RUN=<uuid>`` for the whole
session, so everything a test starts, down to the children of Celery tasks,
is marked with it.  After each test, any marked process still alive is
killed, by PID, and the test fails with the list.
"""

import os
import sys
import uuid

import pytest

from realprocs import RUN_ENV_VAR, RealProcs, reap_leaks
from realsupervisor import Supervisord


def pytest_configure(config):
    os.environ[RUN_ENV_VAR] = uuid.uuid4().hex
    # Celery reads CELERY_BROKER_URL before its own configuration: keep a
    # broker from the surroundings out of the tests' Celery apps and workers.
    os.environ.pop("CELERY_BROKER_URL", None)


def remove_dead_worker_cgroups():
    """Remove the empty worker cgroups whose process is gone (the listener's, in e2e tests).

    A listener places every worker it sees in a cgroup under supervisord's
    (here: pytest's) own; its reap removes it, but a test that ends with
    the listener SIGKILLed leaves it. Only a cgroup named after a process
    that no longer lives is removed, so a placement under way in another
    session is never raced; rmdir fails on a populated one anyway.
    """
    from celery_supervise.processes import cgroups

    found = cgroups.mount()
    parent = cgroups.path_of(os.getpid())
    if found is None or parent is None:
        return
    base = found[0] + cgroups.base_of(parent)
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid, _, rest = name.rpartition("@")[2].partition(".")
        ticks = rest.split(".")[0]
        if not (pid.isdigit() and ticks.isdigit()) or cgroups.start_ticks(int(pid)) == int(ticks):
            continue
        try:
            os.rmdir(os.path.join(base, name))
        except OSError:
            pass
    # Then the folder itself, and its `detached`, once nothing is left in them:
    # a listener of a test supervisord in pytest's own cgroup (the root, on a
    # bare machine) made them there. rmdir refuses a populated or non-empty one.
    for leftover in (os.path.join(base, cgroups.DETACHED), base):
        try:
            os.rmdir(leftover)
        except OSError:
            break


def pytest_sessionfinish(session, exitstatus):
    """Last resort: reap whatever a test or fixture let slip through."""
    remove_dead_worker_cgroups()
    message = reap_leaks(os.environ[RUN_ENV_VAR], exclude={os.getpid()})
    if message is None:
        return
    sys.stderr.write(f"\ncelery-supervise tests, at session end: {message}\n")
    if session.exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture(scope="session")
def test_run_id():
    """The marker value every process started by this pytest run carries."""
    return os.environ[RUN_ENV_VAR]


@pytest.fixture(autouse=True)
def process_leak_guard(test_run_id):
    """Fail the test if it leaves a marked process alive; kill those processes.

    Autouse, so it is set up before, and torn down after, every fixture the
    test requests: supervisord and helper processes are gone by then.
    """
    yield
    message = reap_leaks(test_run_id, exclude={os.getpid()})
    if message is not None:
        pytest.fail(f"test left {message}", pytrace=False)


@pytest.fixture(autouse=True)
def audit_log(tmp_path, monkeypatch):
    """Every test's signals go to its own audit log (never the user's), and this is its path."""
    path = tmp_path / "audit" / "audit.jsonl"
    monkeypatch.setenv("CELERY_SUPERVISE_AUDIT_LOG", str(path))
    return path


@pytest.fixture
def real_procs(tmp_path):
    """A :class:`realprocs.RealProcs` working in ``tmp_path/procs``; reaps at teardown."""
    workdir = tmp_path / "procs"
    workdir.mkdir()
    procs = RealProcs(str(workdir))
    yield procs
    procs.reap()


@pytest.fixture
def supervisor(tmp_path):
    """Factory: ``supervisor(stopsignal="TERM", stopwaitsecs=30, numprocs=1,
    concurrency=2, extra="", broker_url=None)``.

    Starts a real supervisord running the demo worker (program
    ``celery-worker``, processes ``celery-worker_<N>``), by default on the
    guarded filesystem broker, all under ``tmp_path/supervisor<N>``; `extra`
    is appended to the config (``%(here)s`` is that folder); the other
    options of :class:`realsupervisor.Supervisord` (``queues``,
    ``node_prefix``, ``project_dir``…) pass through.  Waits until it
    answers XML-RPC and returns the :class:`realsupervisor.Supervisord`.  It
    does not wait for the worker: call ``.wait_ready()``.  Every supervisord
    started is shut down at teardown.
    """
    started = []

    def start(**options):
        directory = tmp_path / f"supervisor{len(started)}"
        directory.mkdir()
        run = Supervisord(directory, **options)
        started.append(run)
        return run.start()

    yield start
    for run in reversed(started):
        run.stop()

