"""Snapshot cost grows with the tree, not with the machine.

``snapshot.read_worker(root)`` finds descendants through
``/proc/PID/task/*/children``, so it reads only the tree. psutil's
``Process(root).children(recursive=True)``, what one would otherwise call,
reads the parent of *every* process on the machine first. Two cases:

* a 10-process worker tree among 3,000 unrelated processes: the machine is
  big, the tree small;
* a 1,000-process worker tree on an otherwise quiet machine: the tree is big.

Both sides are timed in the same process, alternately, after one warm-up
call each. Ours reads more per process (command line, ids, SigIgn) than
psutil's PID list; that is the real cost of a snapshot.
"""

from __future__ import annotations

import psutil

from celery_supervise import snapshot

from .forest import CROWD, WORKER, Forest
from .measure import Row, Target, summary, timed

OURS = "snapshot.read_worker(root)"
BASELINE = "psutil Process(root).children(recursive=True)"


def _compare(row: Row, root: int, repeats: int) -> tuple[int, int]:
    """Time both sides *repeats* times, alternating; return (ours, psutil) process counts."""
    ours = lambda: snapshot.read_worker(root)  # noqa: E731
    theirs = lambda: psutil.Process(root).children(recursive=True)  # noqa: E731
    ours(), theirs()  # warm-up: imports, dentry caches
    seen = (0, 0)
    for _ in range(repeats):
        t, worker = timed(ours)
        row.ours.append(t)
        t, kids = timed(theirs)
        row.baseline.append(t)
        seen = (len(worker.procs), len(kids) + 1)
    return seen


def small_tree_in_crowd(run_id: str, repeats: int, crowd_size: int = 3000, tree_size: int = 10) -> Row:
    row = Row(
        f"snapshot: {tree_size}-process tree among {crowd_size:,} other processes",
        OURS, BASELINE, Target(seconds=0.005),
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


def big_tree(run_id: str, repeats: int, tree_size: int = 1000) -> Row:
    row = Row(f"snapshot: {tree_size:,}-process tree", OURS, BASELINE, Target(seconds=0.100))
    with Forest(WORKER, tree_size, run_id=run_id) as tree:
        machine = len(psutil.pids())
        ours_n, psutil_n = _compare(row, tree.root, repeats)
        row.notes.append(
            f"{machine:,} processes on the machine; ours read {ours_n} processes (with command line, "
            f"ids and SigIgn), psutil found {psutil_n} (PIDs only)"
        )
    return row


def run(run_id: str, quick: bool = False) -> list[Row]:
    return [
        small_tree_in_crowd(run_id, repeats=10 if quick else 30),
        big_tree(run_id, repeats=5 if quick else 15),
    ]
