"""The soak, small: one restart cycle of each kind, and nothing leaked, killed wrongly or lost.

Runs ``bench/soak.py --quick`` as a real subprocess: a real supervisord with
the demo worker, the eventlistener and a bystander program, on Redis db 14
(the soak's own, flushed at its start), four cycles (``deploy.sh``,
``celery-supervise restart``, ``supervisorctl restart`` with the listener
reaping, ``kill -9`` of supervisord and a new one). Every process it starts
inherits this run's leak-guard mark, and the soak kills its own leftovers
by PID before it exits; the leak guard checks that it did.
"""

import json
import os
import subprocess
import sys

import pytest

from brokers import require
from realsupervisor import REPO

pytestmark = pytest.mark.e2e

SOAK = REPO / "bench" / "soak.py"
REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.mark.timeout(180)
def test_quick_soak_one_cycle_per_mode_counts_nothing():
    require(REDIS_URL)
    result = subprocess.run([sys.executable, str(SOAK), "--quick", "--json"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=170, cwd=REPO)
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.strip(), output
    doc = json.loads(result.stdout)
    assert doc["error"] is None, output
    assert doc["cycles"] == 4 and sorted(doc["times"]) == sorted(["deploy", "restart", "supervisorctl", "kill-9"])
    assert doc["counts"] == {"attached_leaked": 0, "detached_killed": 0, "tasks_lost": 0, "innocents_killed": 0,
                             "audit_missing": 0}, output
    assert doc["sent"] > 0 and doc["final_leftovers"] is None, output
    assert result.returncode == 0, output
    print(result.stderr)


#: The short chaos soak's faults, one cycle each: the tool and the listener
#: SIGKILLed mid-kill, the broker killed mid-drain, the state folder full.
CHAOS_FAULTS = "tool-killed-mid-kill,listener-killed-mid-reap,broker-down-at-drain,state-folder-full"


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0, reason="the state-folder-full fault mounts a tiny tmpfs (root only)")
def test_short_chaos_soak_one_fault_per_cycle_counts_nothing():
    """``bench/soak.py --chaos``: four faults, one per cycle (fixed seed), on a private redis-server.

    Every count is 0, the audit log's included: each signal the witnesses
    received is logged, with its sender.
    """
    result = subprocess.run([sys.executable, str(SOAK), "--chaos", "--quick", "--cycles", "4", "--seed", "13",
                             "--faults", CHAOS_FAULTS, "--json"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=230, cwd=REPO)
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.strip(), output
    doc = json.loads(result.stdout)
    assert doc["error"] is None, output
    assert doc["chaos"] is True and sorted(doc["times"]) == sorted(CHAOS_FAULTS.split(",")), output
    assert doc["counts"] == {"attached_leaked": 0, "detached_killed": 0, "tasks_lost": 0, "innocents_killed": 0,
                             "audit_missing": 0}, output
    missed = [n for notes in doc["notes"].values() for n in notes if n.startswith("FAULT MISSED")]
    assert missed == [], output
    assert doc["final_leftovers"] is None and result.returncode == 0, output
    print(result.stderr)
