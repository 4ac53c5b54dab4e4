"""How long killing a 1,000-process worker tree takes.

Ours: the tree is read with ``snapshot.read_worker(root)`` (main, 2 pools,
task shells and sleeps below them), planned with ``plan.plan`` under the
default policy, and carried out with ``kill.execute(verdicts, grace=5)``.
The clock runs from the call of ``execute`` (before the first SIGTERM) until
it returns, which it does once every target is gone: each signal re-checks
the process's identity through a pidfd and its creation time.

Baseline: what one writes by hand: ``os.kill(pid, SIGTERM)`` for every PID
of the tree, then poll every 20 ms (``kill.POLL_INTERVAL``) until each is
gone (no ``/proc/PID`` or a zombie, as ours counts). No identity check at all.

Every repeat kills a fresh tree; the spawner above it reaps what dies.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from celery_supervise import kill, plan, snapshot

from .forest import WORKER, Forest, is_gone
from .measure import Row, Target, timed


def _ours(run_id: str, size: int) -> tuple[float, dict]:
    with Forest(WORKER, size, run_id=run_id) as tree:
        worker = snapshot.read_worker(tree.root)
        verdicts = plan.plan([worker], plan.Policy())
        seconds, report = timed(lambda: kill.execute(verdicts, grace=5))
        left = [p.pid for p in worker.procs if not is_gone(p.pid)]
        tree.wait_empty()
    # KILLED without a signal: it exited before its turn came (a shell whose
    # sleeps were just killed); the report still counts it as killed.
    outcomes = Counter(f"{o.status} by {o.signal}" if o.signal else f"{o.status}, no signal needed"
                       for o in report.outcomes)
    roles = Counter(p.role for p in worker.procs)
    return seconds, {"outcomes": dict(outcomes), "roles": dict(roles), "left": left}


def _raw(pids: list[int]) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    left = [p for p in pids if not is_gone(p)]
    deadline = time.monotonic() + 5
    while left and time.monotonic() < deadline:
        time.sleep(kill.POLL_INTERVAL)
        left = [p for p in left if not is_gone(p)]
    return left


def _baseline(run_id: str, size: int) -> tuple[float, list[int]]:
    with Forest(WORKER, size, run_id=run_id) as tree:
        pids = list(tree.pids)  # root first, then descendants: the order a PID listing gives
        seconds, left = timed(lambda: _raw(pids))
        tree.wait_empty()
    return seconds, left


def run(run_id: str, quick: bool = False, size: int = 1000) -> list[Row]:
    row = Row(
        f"kill: {size:,}-process worker tree (SIGTERM → all gone)",
        "kill.execute(plan(read_worker(root)), grace=5)",
        "os.kill(SIGTERM) each PID, poll until gone",
        Target(seconds=0.200),
    )
    details = []
    for _ in range(3 if quick else 7):
        seconds, info = _ours(run_id, size)
        row.ours.append(seconds)
        details.append(info)
        seconds, left = _baseline(run_id, size)
        row.baseline.append(seconds)
        if left:
            row.notes.append(f"baseline: {len(left)} processes outlived SIGTERM for 5 s")
    last = details[-1]
    row.notes.append(f"roles {last['roles']}; outcomes of the last run {last['outcomes']}")
    stragglers = sum(len(d["left"]) for d in details)
    if stragglers:
        row.notes.append(f"ours: {stragglers} processes were still alive when execute() returned")
    return [row]
