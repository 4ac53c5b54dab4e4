"""What per-worker cgroup tracking costs (docs/escapes.md).

Two rows, each timed in this process with the other side alternating:

* finding the escaped members at kill time: ``cgroups.read_members`` on a
  cgroup holding 10 escaped processes, against the process-group scan the
  kill already runs for every worker (``procs.pids_in_group``, one
  ``getpgid`` per process on the machine). Target: ≤ 1 ms.
* placing a worker: make ``<base>/<name>`` and write its PID to
  ``cgroup.procs`` (what the listener does at PROCESS_STATE_STARTING and
  ``contain`` before its exec), against ``os.fork`` + exit of a child,
  the cheapest thing a worker does anyway. Target: ≤ 1 ms.

Needs root and a writable cgroup v2 mount; skipped otherwise. Everything
runs under a cgroup of the bench's own, removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import psutil

from celery_supervise.processes import cgroups, procs

from .measure import Row, Target, order, timed

MEMBERS = 10


def _mount() -> str | None:
    found = cgroups.mount()
    return found[0] if found and not found[1] and os.geteuid() == 0 else None


def run(run_id: str, quick: bool = False) -> list[Row]:
    repeats = 5 if quick else 20
    read = Row(f"cgroup: find {MEMBERS} escaped members at kill time", "cgroups.read_members",
               "process-group scan (pids_in_group)", Target(seconds=0.001))
    place = Row("cgroup: place one worker (mkdir + write cgroup.procs)", "cgroups.place",
                "os.fork() + child exit + waitpid", Target(seconds=0.001))
    root = _mount()
    if root is None:
        read.skipped = place.skipped = "needs root and a writable cgroup v2 mount"
        return [read, place]
    top = f"/cs-bench-{uuid.uuid4().hex[:8]}"
    home = cgroups.path_of(os.getpid()) or "/"
    os.mkdir(root + top)
    _enter(root + top, os.getpid())  # worker cgroups nest under ours: all of them under top
    children = []
    try:
        main = subprocess.Popen(["sleep", "120"], env={**os.environ, "CELERY_SUPERVISE_BENCH": run_id})
        children.append(main)
        cg = cgroups.place(main.pid, "bench", parent_pid=os.getpid())
        # The members: a shell that joins the worker's cgroup, then starts the sleeps.
        shell = subprocess.Popen(["sh", "-c", f'echo $$ > {root}{cg.path}/cgroup.procs; '
                                  f'for i in $(seq {MEMBERS}); do sleep 120 & done; wait'])
        children.append(shell)
        deadline = time.monotonic() + 10
        while len(cgroups.members(cg)[0] or ()) < MEMBERS + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        main_proc = procs.read_proc(main.pid)
        ours = lambda: cgroups.read_members(cg, main_proc, {main.pid})  # noqa: E731
        theirs = lambda: procs.pids_in_group(main.pid)  # noqa: E731
        ours(), theirs()
        for i in range(repeats):
            for side in order(i):
                t, _ = timed(ours if side == "ours" else theirs)
                (read.ours if side == "ours" else read.baseline).append(t)
        read.notes.append(f"{len(ours()[0])} members found; {len(psutil.pids())} processes on the machine")

        def place_once() -> float:
            child = subprocess.Popen(["sleep", "30"])
            try:
                return timed(lambda: cgroups.place(child.pid, "bench", parent_pid=os.getpid()))[0]
            finally:
                child.kill()
                child.wait()

        def fork_once() -> float:
            def fork():
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
            return timed(fork)[0]

        for i in range(repeats):
            for side in order(i):
                (place.ours if side == "ours" else place.baseline).append(
                    place_once() if side == "ours" else fork_once())
        return [read, place]
    finally:
        for p in children:
            p.kill()
            p.wait()
        _enter(root + home, os.getpid())
        for folder, _, _ in sorted(os.walk(root + top), key=lambda w: -len(w[0])):
            for pid in open(os.path.join(folder, "cgroup.procs")).read().split():
                _enter(root + home, int(pid))  # a sleep's zombie-free leftovers, if any
            os.rmdir(folder)


def _enter(folder: str, pid: int) -> None:
    with open(os.path.join(folder, "cgroup.procs"), "w") as f:
        f.write(str(pid))
