"""Snapshot cost grows with the tree, not with the machine.

``snapshot.read_worker(root)`` finds descendants through
``/proc/PID/task/*/children``, so it reads only the tree. psutil's
``Process(root).children(recursive=True)``, what one would otherwise call,
reads the parent of *every* process on the machine first. Two cases:

* a 10-process worker tree among 3,000 unrelated processes: the machine is
  big, the tree small;
* a 1,000-process worker tree on an otherwise quiet machine: the tree is big.

Both sides are timed in the same process, after one warm-up call each,
alternating which side goes first from one repeat to the next. Ours reads
more per process (command line, ids, SigIgn) than psutil's PID list; that
is the real cost of a snapshot. Targets: the small tree ≤ 1 ms; the big
one ≤ 0.5× psutil's PID-only walk.
"""

from __future__ import annotations

import psutil

from celery_supervise.processes import snapshot

from .forest import CROWD, WORKER, Forest
from .measure import Row, Target, cpu_seconds, order, summary, timed

OURS = "snapshot.read_worker(root)"
BASELINE = "psutil Process(root).children(recursive=True)"


def _compare(row: Row, root: int, repeats: int, cpu: Row | None = None) -> tuple[int, int]:
    """Time both sides *repeats* times, alternating; return (ours, psutil) process counts.

    With *cpu*, each call's CPU time (this process's user + system) goes there.
    """
    ours = lambda: snapshot.read_worker(root)  # noqa: E731
    theirs = lambda: psutil.Process(root).children(recursive=True)  # noqa: E731
    ours(), theirs()  # warm-up: imports, dentry caches
    found = {}
    for i in range(repeats):
        for side in order(i):
            used = cpu_seconds()
            t, found[side] = timed(ours if side == "ours" else theirs)
            used = cpu_seconds() - used
            (row.ours if side == "ours" else row.baseline).append(t)
            if cpu is not None:
                (cpu.ours if side == "ours" else cpu.baseline).append(used)
    return len(found["ours"].procs), len(found["baseline"]) + 1


def small_tree_in_crowd(run_id: str, repeats: int, crowd_size: int = 3000, tree_size: int = 10) -> Row:
    row = Row(
        f"snapshot: {tree_size}-process tree among {crowd_size:,} other processes",
        OURS, BASELINE, Target(seconds=0.001),
    )
    with Forest(WORKER, tree_size, run_id=run_id) as tree:
        with Forest(CROWD, crowd_size, run_id=run_id) as crowd:
            machine = len(psutil.pids())
            ours_n, psutil_n = _compare(row, tree.root, repeats)
        # The same tree once the crowd is gone: the difference is what the
        # crowd costs each side. (Measured after, not before: on this VM both
        # sides ran ~1.5 ms slower before the burst of 3,000 spawns than after
        # it, whatever the order, which would blur the comparison.)
        quiet = Row(row.name, OURS, BASELINE, row.target)
        quiet_machine = len(psutil.pids())
        _compare(quiet, tree.root, repeats)
    row.notes.append(
        f"{machine:,} processes on the machine (crowd of {len(crowd.pids):,}); "
        f"ours read {ours_n} processes, psutil found {psutil_n}. The same tree after the crowd left, "
        f"{quiet_machine:,} processes on the machine: ours {summary(quiet.ours)}, "
        f"psutil {summary(quiet.baseline)}"
    )
    return row


def big_tree(run_id: str, repeats: int, tree_size: int = 1000) -> list[Row]:
    row = Row(f"snapshot: {tree_size:,}-process tree", OURS, BASELINE, Target(ratio=0.5))
    cpu = Row(f"snapshot: {tree_size:,}-process tree, CPU time (user+sys)", OURS, BASELINE, Target(ratio=0.5))
    with Forest(WORKER, tree_size, run_id=run_id) as tree:
        machine = len(psutil.pids())
        ours_n, psutil_n = _compare(row, tree.root, repeats, cpu)
        row.notes.append(
            f"{machine:,} processes on the machine; ours read {ours_n} processes (with command line, "
            f"ids and SigIgn), psutil found {psutil_n} (PIDs only)"
        )
    return [row, cpu]


def run(run_id: str, quick: bool = False) -> list[Row]:
    return [small_tree_in_crowd(run_id, repeats=10 if quick else 30), *big_tree(run_id, repeats=9 if quick else 21)]
