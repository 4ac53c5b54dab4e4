"""The listener's wait-loop helpers on plain data: which command lines may still exec a worker, and the retry table."""

import os

import pytest

from celery_supervise.celery_side.discovery import may_become_worker
from celery_supervise.processes.procs import Identity
from celery_supervise.supervisord.watching import RETRY_FOR, Pending, Pidfds


def alive_as(live):
    """*alive* for :meth:`Pending.due` on plain data: ``{pid: creation time of the live process}``."""
    return lambda ident: ident.same(Identity(ident.pid, live[ident.pid]) if live.get(ident.pid) is not None else None)


@pytest.mark.parametrize("cmdline, expected", [
    (["/venv/bin/celery-supervise", "contain", "--", "/venv/bin/celery", "-A", "demo", "worker", "-c", "2"], True),
    (["newrelic-admin", "run-program", "celery", "-A", "demo", "worker"], True),
    (["sh", "-c", "sleep 3; exec /venv/bin/celery -A demo worker -l info"], True),
    (["/venv/bin/python", "-m", "celery", "-A", "demo", "worker"], True),
    (["/venv/bin/celery", "-A", "demo", "beat"], False),  # not a worker
    (["/venv/bin/celery-supervise", "listener", "--state-dir", "/var/lib/x"], False),  # ourselves
    (["sleep", "300"], False),
    (["bash", "-c", "set -m; sleep 301 & wait"], False),
    (["python", "worker.py", "--celery"], False),  # neither word on its own
    ([], False),
])
def test_may_become_worker(cmdline, expected):
    assert may_become_worker(cmdline) is expected


@pytest.mark.parametrize("live_create_time, now, kept, expired", [
    (100.0, 10.0, True, False),            # the same process, not exec'd yet: still pending
    (None, 10.0, False, False),            # gone: dropped
    (250.0, 10.0, False, False),           # the PID names another process now: dropped, never retried
    (100.0, 10.0 + RETRY_FOR, False, True),  # too long: dropped, reported expired
])
def test_pending_due(live_create_time, now, kept, expired):
    pending = Pending()
    pending.add("celery-worker:celery-worker_0", {"pid": "42"}, Identity(42, 100.0), now=10.0)
    live, gone = pending.due(now, alive_as({42: live_create_time}))
    assert [p for p, _ in live] == (["celery-worker:celery-worker_0"] if kept else [])
    assert [p for p, _ in gone] == (["celery-worker:celery-worker_0"] if expired else [])
    assert bool(pending) is kept


def test_pending_keeps_the_latest_running_of_a_program_and_drops_on_request():
    pending = Pending()
    pending.add("w", {"pid": "1"}, Identity(41, 1.0), now=0.0)
    pending.add("w", {"pid": "2"}, Identity(42, 2.0), now=0.0)
    [(program, entry)], _ = pending.due(1.0, alive_as({42: 2.0}))
    assert (program, entry.pid, entry.fields) == ("w", 42, {"pid": "2"})
    pending.drop("w")
    assert not pending


def test_pidfds_hold_only_a_process_that_is_still_the_recorded_one():
    fds = Pidfds()
    fds.add("a", os.getpid(), lambda: True)
    fds.add("b", os.getpid(), lambda: False)  # the PID was reused between the snapshot and the open
    assert list(fds.by_fd().values()) == ["a"]
    fds.close()
    assert fds.by_fd() == {}
