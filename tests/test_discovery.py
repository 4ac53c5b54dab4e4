"""Command-line parsing and app matching, on plain data."""

import socket

import pytest

from celery_supervise.celery_side.discovery import app_names_match, parse_worker_cmdline, start_time_agrees

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
