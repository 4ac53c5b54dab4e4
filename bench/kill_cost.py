"""How long killing a 1,000-process worker tree takes, against raw signalling.

Ours: the tree is read with ``snapshot.read_worker(root)`` (main, 2 pools,
task shells and sleeps below them), planned with ``plan.plan`` under the
default policy, and carried out with ``kill.execute(verdicts, grace=5)``.
The clock runs from the call of ``execute`` (before the first pidfd is
opened) until it returns, which it does once every target is gone: each
target is pinned with a pidfd and its creation time checked before the
first signal, the signals go children first, and the pidfds say when each
process has exited.

Baseline ("raw"): what one writes by hand, with no identity check at all:
``os.kill(pid, SIGTERM)`` for every PID of the tree, then poll every 20 ms
(``kill.POLL_INTERVAL``) until each is gone (no ``/proc/PID`` or a zombie,
as ours counts). In two orders, each a side of its own:

* **root first**, the order a PID listing gives (the tree's depth-first
  listing): the target row, as issue 14 measured it;
* **children first**, the order ours must keep: the difference between it
  and ours is what the identity checks and pidfds cost, and the
  difference between the two raw orders what the order costs.

Every repeat kills a fresh tree; the spawner above it reaps what dies. The
order of the three sides rotates from one repeat to the next. Besides the
wall time, ours and root-first raw report their CPU time (user + system of
this process during the call).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from celery_supervise.processes import kill, plan, snapshot
from celery_supervise.processes import revisit as revisiting

from .forest import WORKER, Forest, is_gone
from .measure import Row, Target, cpu_seconds, median, order, summary, timed

SIDES = ("ours", "raw root first", "raw children first")


def _ours(run_id: str, size: int) -> tuple[float, float, dict]:
    with Forest(WORKER, size, run_id=run_id) as tree:
        worker = snapshot.read_worker(tree.root)
        # What a kill from a record does first (not in the timed call):
        # re-verify every recorded process and look for newcomers.
        revisit_seconds, _ = timed(lambda: revisiting.revisit(worker))
        verdicts = plan.plan([worker], plan.Policy())
        cpu = cpu_seconds()
        seconds, report = timed(lambda: kill.execute(verdicts, grace=5))
        cpu = cpu_seconds() - cpu
        left = [p.pid for p in worker.procs if not is_gone(p.pid)]
        tree.wait_empty()
    # KILLED without a signal: it exited before its turn came (a shell whose
    # sleeps were just killed); the report still counts it as killed.
    outcomes = Counter(f"{o.status} by {o.signal}" if o.signal else f"{o.status}, no signal needed"
                       for o in report.outcomes)
    roles = Counter(p.role for p in worker.procs)
    return seconds, cpu, {"outcomes": dict(outcomes), "roles": dict(roles), "left": left,
                          "revisit": revisit_seconds}


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


def _baseline(run_id: str, size: int, root_first: bool) -> tuple[float, float, list[int]]:
    with Forest(WORKER, size, run_id=run_id) as tree:
        # tree.pids: root first, then each process before its descendants
        # (a depth-first listing); reversed, every child comes before its parent.
        pids = list(tree.pids) if root_first else list(reversed(tree.pids))
        cpu = cpu_seconds()
        seconds, left = timed(lambda: _raw(pids))
        cpu = cpu_seconds() - cpu
        tree.wait_empty()
    return seconds, cpu, left


def run(run_id: str, quick: bool = False, size: int = 1000) -> list[Row]:
    ours_label = "kill.execute(plan(read_worker(root)), grace=5)"
    root_label = "os.kill(SIGTERM) each PID, root first, poll until gone"
    row = Row(f"kill: {size:,}-process worker tree (SIGTERM → all gone)", ours_label, root_label, Target(ratio=1.2))
    same = Row(f"kill: {size:,}-process worker tree, against raw signals in our order", ours_label,
               "os.kill(SIGTERM) each PID, children first, poll until gone", Target())
    cpu = Row(f"kill: {size:,}-process worker tree, CPU time of the killing process", ours_label, root_label,
              Target())
    details = []
    for i in range(7 if quick else 11):
        for side in order(i, SIDES):
            if side == "ours":
                seconds, used, info = _ours(run_id, size)
                for r in (row, same):
                    r.ours.append(seconds)
                cpu.ours.append(used)
                details.append(info)
                continue
            seconds, used, left = _baseline(run_id, size, root_first=side == "raw root first")
            if side == "raw root first":
                row.baseline.append(seconds)
                cpu.baseline.append(used)
            else:
                same.baseline.append(seconds)
            if left:
                row.notes.append(f"{side}: {len(left)} processes outlived SIGTERM for 5 s")
    last = details[-1]
    row.notes.append(f"roles {last['roles']}; outcomes of the last run {last['outcomes']}")
    row.notes.append("not in the timed call: re-verifying the record first (processes.revisit.revisit, what `kill FILE` "
                     f"does before it signals) took {summary([d['revisit'] for d in details])}")
    same.notes.append(f"raw children first / raw root first: {median(same.baseline) / median(row.baseline):.2f}× "
                      "(what the order alone costs; ours keeps children first)")
    stragglers = sum(len(d["left"]) for d in details)
    if stragglers:
        row.notes.append(f"ours: {stragglers} processes were still alive when execute() returned")
    return [row, same, cpu]
