"""A kill with few file descriptors left: targets beyond the pidfd budget are still killed, one by one.

The kill pins each target with a pidfd before the first signal and keeps
them open while it waits (``kill.Pins``). It never takes more than the soft
``RLIMIT_NOFILE`` leaves free, less ``kill.FD_HEADROOM``; past that budget a
target is signalled as before, by ``kill.signal_proc`` (pidfd, identity
check, signal, close), and its exit is polled. Here the CLI runs under a
real, low limit, on the fake worker's real tree (see ``test_kill.py``)::

    main (group leader)          kill
    ├── pool                     kill
    │   ├── sleep                kill
    │   ├── sh ── sleep          kill
    │   ├── nohup sleep          spare  nohup
    │   └── setsid sleep         spare  own session
    └── pool                     (the same again)

The driver below lowers the limit once the CLI's modules are imported (to
what is open then, plus the headroom, plus *extra*) and counts, at that one
boundary, the targets that went through ``signal_proc``.
"""

import json
import subprocess
import sys

import pytest

from test_kill import alive, fake_worker, pids, write_state  # noqa: F401 (fake_worker is a fixture)

from celery_supervise.processes import snapshot

DRIVER = """
import os, resource, sys
from celery_supervise import entry, fastpath, render  # imported before the limit is lowered
from celery_supervise.commands import kill as kill_verb  # noqa: F401 (likewise)
from celery_supervise.processes import kill
extra = int(sys.argv.pop(1))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + kill.FD_HEADROOM + extra, hard))
one_by_one = set()
original = kill.signal_proc
def counting(proc, sig):
    one_by_one.add(proc.pid)
    return original(proc, sig)
kill.signal_proc = counting
# The console script's own path (entry.main) without its final os._exit,
# so that the count is printed after the command.
call = fastpath.parse(sys.argv[1:], os.environ)
assert call is not None, sys.argv
code = entry.run_fast(call)
print(f"one by one: {len(one_by_one)}", file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("extra, pinned", [(6, "some"), (0, "none")])
def test_a_kill_past_its_pidfd_budget_still_kills_every_attached_process(fake_worker, tmp_path, extra, pinned):
    state = write_state(tmp_path / "state.json", snapshot.read_worker(fake_worker["main"]))
    res = subprocess.run([sys.executable, "-c", DRIVER, str(extra), "kill", state, "--grace", "5", "--json"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    by_status = {}
    for p in json.loads(res.stdout)["processes"]:
        by_status.setdefault(p["status"], set()).add(p["pid"])
    attached = {fake_worker["main"]} | pids(fake_worker, "pool", "plain", "parent", "grandchild")
    detached = pids(fake_worker, "nohup", "setsid")
    assert by_status == {"killed": attached, "spared": detached}
    assert not any(alive(p) for p in attached)
    assert all(alive(p) for p in detached)
    one_by_one = int(res.stderr.rsplit("one by one: ", 1)[1])
    if pinned == "some":
        assert 0 < one_by_one < len(attached), res.stderr
    else:
        assert one_by_one == len(attached), res.stderr
