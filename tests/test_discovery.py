"""Command-line parsing and app matching, on plain data; a broker reply's identity, against real processes."""

import os
import socket
import time

import pytest

from celery_supervise.celery_side.discovery import (
    Found, WorkerCommand, app_names_match, parse_worker_cmdline, reply_is_ours, start_time_agrees,
)
from celery_supervise.processes import procs

HOST = socket.gethostname()


@pytest.mark.parametrize(
    "argv, app, node",
    [
        (["celery", "-A", "demo", "worker"], "demo", f"celery@{HOST}"),
        (["/venv/bin/python3", "/venv/bin/celery", "-A", "demo", "worker", "-n", "w1@%h"], "demo", f"w1@{HOST}"),
        (["python", "-u", "-m", "celery", "--app=proj.celery:app", "worker", "--hostname", "x@y"],
         "proj.celery:app", "x@y"),
        (["celery", "worker", "-Aproj"], "proj", f"celery@{HOST}"),
    ],
)
def test_worker_command_lines(argv, app, node):
    command = parse_worker_cmdline(argv)
    assert (command.app, command.node) == (app, node)


@pytest.mark.parametrize(
    "argv",
    [
        ["timeout", "-k", "5", "90", "celery", "-A", "demo", "worker"],  # a wrapper that forks the worker
        ["sudo", "-u", "celery", "/venv/bin/celery", "-A", "demo", "worker"],
        ["celery", "-A", "demo", "beat"],
        ["celery", "-A", "demo", "inspect", "active"],
        ["python", "manage.py", "celery", "worker"],
        ["vim", "celery", "worker"],
        [],
    ],
)
def test_not_worker_command_lines(argv):
    assert parse_worker_cmdline(argv) is None


def test_app_from_environment():
    assert parse_worker_cmdline(["celery", "worker"], {"CELERY_APP": "proj"}).app == "proj"


@pytest.mark.parametrize(
    "worker_app, wanted, match",
    [
        ("demo", "demo", True),
        ("demo", "demo.celery:app", True),
        ("demo.celery", "demo", True),
        ("demo", "demo2", False),
        ("demo2.celery:app", "demo", False),
        (None, "demo", False),
    ],
)
def test_app_names_match(worker_app, wanted, match):
    assert app_names_match(worker_app, wanted) is match


@pytest.mark.parametrize(
    "create_time, uptime, now, agrees",
    [
        (1000.0, 10, 1011.0, True),  # started 1 s after the process was created
        (1000.0, 10, 1009.0, True),  # rounding of uptime
        (1000.0, 10, 1100.0, True),  # slow start-up, within bounds
        (1000.0, 10, 2000.0, False),  # the reply's worker started long after this process
        (1000.0, 100, 1010.0, False),  # the reply's worker is older than this process
    ],
)
def test_start_time_agreement(create_time, uptime, now, agrees):
    assert start_time_agrees(create_time, uptime, now) is agrees


# ``reply_is_ours``: a real process stands in for the worker's main, its
# child for a pool process; the ``stats`` replies are data.
#
#     sh (the "worker")            its PID is the reply's pid
#     └── sleep (a "pool process")
#
# ``now - uptime`` is the start the reply claims. Set ahead by STEP seconds
# while the worker ran, the wall clock makes it claim a start STEP seconds
# before its process existed.
STEP = 60.0
NODE = "w1@host"


def _reply(pid, started, now, pool=None):
    reply = {"pid": pid, "uptime": round(now - started)}
    if pool is not None:
        reply["pool"] = {"processes": pool}
    return reply


@pytest.fixture
def worker(real_procs):
    chain = real_procs.spawn_chain()
    return chain.child.pid, chain.grandchild.pid, procs.live_identity(chain.child.pid)


@pytest.mark.parametrize(
    "clock_set_ahead, pool, node, ours",
    [
        (False, None, NODE, True),  # a solo pool: the start time alone
        (False, "child", NODE, True),
        (True, "child", NODE, True),  # the clock was set: the pool, a child here, vouches for it
        (True, None, NODE, False),  # no pool and a start before its process: not provably ours
        (True, "empty", NODE, False),
        (True, "stranger", NODE, False),  # a live process here, but not its child: another host's pool
        (True, "child+stranger", NODE, False),
        (False, "child", "w2@host", False),  # another node's reply naming our PID
    ],
)
def test_reply_is_ours(worker, clock_set_ahead, pool, node, ours):
    main, child, created = worker
    now = time.time()
    started = created + 0.5 - (STEP if clock_set_ahead else 0.0)
    pools = {None: None, "empty": [], "child": [child], "stranger": [os.getpid()], "child+stranger": [child, os.getpid()]}
    reply = _reply(main, started, now, pools[pool])
    found = Found(main, WorkerCommand(app="demo", node=NODE))
    assert reply_is_ours(found, node, reply, now) is ours


def test_a_reply_for_a_gone_process_is_not_ours(real_procs):
    """Its PID named nobody here any more: neither the start time nor the pool can vouch for it."""
    chain = real_procs.spawn_chain()
    main, child, created = chain.child.pid, chain.grandchild.pid, procs.live_identity(chain.child.pid)
    chain.grandchild.kill()
    chain.child.kill()
    chain.child.wait(10)
    now = time.time()
    assert not reply_is_ours(Found(main, WorkerCommand(app="demo", node=NODE)), NODE,
                             _reply(main, created + 0.5, now, [child]), now)
