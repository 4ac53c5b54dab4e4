"""Exit code 3: a process we may not signal is reported as failed, never swallowed.

A forked copy of this test drops to an unprivileged user and runs the kill
against a record of a root-owned process: the kernel refuses the signal
with EPERM. Forking (rather than running the CLI as that user) keeps the
already imported code, so the test does not depend on the user being able
to read the checkout or the virtualenv.
"""

import json
import os
import tempfile

import psutil
import pytest

from celery_supervise.commands import kill as kill_cmd
from celery_supervise.processes import plan, snapshot, statefile
from celery_supervise.processes.plan import Policy

NOBODY = 65534


@pytest.fixture
def nobody_dir():
    # /tmp is world-traversable; pytest's own tmp dirs are 0700 root.
    folder = tempfile.mkdtemp(prefix="celery-supervise-test-", dir="/tmp")
    os.chmod(folder, 0o755)
    os.chown(folder, NOBODY, NOBODY)
    yield folder
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)


def kill_as(uid, path, lock):
    """Run kill_cmd.kill in a child process with *uid*; return (exit code, document)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            os.close(read_end)
            os.environ["CELERY_SUPERVISE_LOCK"] = lock
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = kill_cmd.kill(path, grace=1)
            os.write(write_end, json.dumps([result.exit_code, result.to_document()]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged kill crashed"
    return json.loads(data)


def test_access_denied_is_failed_with_exit_3(real_procs, nobody_dir):
    victim = real_procs.spawn(["sleep", "60"], process_group=0)
    worker = snapshot.read_worker(victim.pid)
    path = os.path.join(nobody_dir, "state.json")
    statefile.write(path, statefile.to_document(snapshot.take([worker], "t"), Policy(),
                                                plan.plan([worker], Policy())))
    os.chown(path, NOBODY, NOBODY)  # the unprivileged user's own file, as it must be

    code, doc = kill_as(NOBODY, path, os.path.join(nobody_dir, "lock"))

    assert code == 3
    (entry,) = doc["processes"]
    assert entry["status"] == "failed"
    assert entry["reason"] == "access denied (SIGTERM)"
    assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE
