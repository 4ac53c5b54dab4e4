"""Bad input to ``python manage.py celery``: exit code 1 and one ``CommandError`` line.

Real subprocesses of the demo project's manage.py; nothing is signalled,
since every case fails before anything is read from a worker.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from realsupervisor import DJANGO_APP


def manage(*args, tmp_path):
    env = dict(os.environ, CELERY_SUPERVISE_BROKER_DIR=str(tmp_path / "broker"))
    return subprocess.run(
        [sys.executable, "manage.py", "celery", *args],
        cwd=DJANGO_APP, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )


def write(path, text, mode=0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def foreign_host_record(path):
    doc = {"schema": 1, "kind": "celery-supervise/state", "host": socket.gethostname() + "-elsewhere",
           "boot_time": 0, "taken_at": 0, "policy": "setsid,nohup", "workers": [], "verdicts": []}
    return write(path, json.dumps(doc))


# (name, command built from a tmp_path, the message after "CommandError: ")
CASES = [
    ("missing file", lambda t: ["kill", str(t / "nope.json")], lambda t: f"{t}/nope.json: no such file"),
    ("truncated JSON", lambda t: ["kill", write(t / "state.json", '{"schema": 1, "kind"')],
     lambda t: f"{t}/state.json: is neither a celery-supervise state file (not valid JSON; truncated?) "
               "nor a list of PIDs"),
    ("world-writable", lambda t: ["kill", write(t / "state.json", "{}", 0o666)],
     lambda t: f"{t}/state.json: is group- or world-writable (mode 0666); refusing to trust it"),
    ("names PID 1", lambda t: ["kill", write(t / "pids.txt", "1\n")],
     lambda t: f"{t}/pids.txt: PID list: names PID 1; refusing"),
    ("another host", lambda t: ["kill", "--dry-run", foreign_host_record(t / "state.json")],
     lambda t: f"{t}/state.json: was written on host '{socket.gethostname()}-elsewhere', "
               f"this is '{socket.gethostname()}'"),
    ("no such folder", lambda t: ["savepid", str(t / "missing" / "state.json")],
     lambda t: f"{t}/missing/state.json: its folder does not exist"),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_command_error_line_and_exit_1(tmp_path, build, message):
    result = manage(*build(tmp_path), tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"CommandError: {message(tmp_path)}"]
    assert result.stdout == ""
