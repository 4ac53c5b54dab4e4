"""celery-supervise against the old workaround, after a stop that cuts tasks off.

The old workaround, which users run today around ``supervisorctl stop``:
a script saves the ``worker_pid`` of every task in
``app.control.inspect().active()`` (Celery's default 1 s timeout) to a text
file before the stop, and ``kill -9 $(cat FILE)`` runs after it. Ours is the
deploy-script path: ``celery-supervise -A demo savepid FILE --supervisor-url
URL --program 'celery-worker:*'`` before the stop, ``celery-supervise -A demo
kill FILE --grace 2`` after it.

Each repeat, for each side (the order alternates between repeats): a real
supervisord runs the demo worker (``-c 2``, ``stopsignal=TERM``,
``stopwaitsecs=2``) in a private copy of the demo project on the guarded
filesystem transport; two ``spawn_family`` tasks run (their marker files
awaited). Each task has six children: three attached (``sleep``, ``sh`` and
its ``sleep``) and three detached (a ``nohup``'d ``sleep``, a ``setsid``'d
``sh`` and its ``sleep``). Then save → ``supervisorctl stop`` (the worker
is still busy when ``stopwaitsecs`` runs out, so supervisord SIGKILLs the
main process, as users meet it) → kill. Measured:

* ``seconds``: wall time of the save command plus the kill command, each a
  fresh process (imports, app, broker connection included); the stop is
  not counted (``stop_seconds`` gives it);
* ``attached_left``: of the processes that should die (the main process,
  its pool processes, the tasks' attached children), how many are still
  alive ``SETTLE`` seconds after the kill command returned (``kill -9``
  returns before its signals are acted on);
* ``detached_killed``: of the six detached children, how many are gone.

PID reuse is not measured here. Every process started here carries the
tests' run mark (``CELERY_SUPERVISE_TEST_RUN``, with a value of its own) in
its environment and has a bounded lifetime: the tasks' children exit after
``LIFETIME`` seconds, and a pidfd watchdog shuts supervisord down (TERM,
then KILL) if this benchmark overruns. After each repeat everything the
tasks started, including what the old script left alive, is killed by PID;
at the end supervisord is shut down and a sweep by the run mark kills
anything left.

    .venv/bin/python bench/old_script_bench.py [--repeats N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
BIN = Path(sys.executable).parent
CELERY_SUPERVISE = str(BIN / "celery-supervise")
SUPERVISORCTL = str(BIN / "supervisorctl")

PROGRAM = "celery-worker"  # the harness's worker program
GRACE = 2.0  # ours: kill --grace
STOPWAITSECS = 2  # the stop SIGKILLs the busy worker's main process after this
SETTLE = 1.0  # seconds after the kill command returned, for SIGKILLs to take effect
HOLD = 60  # how long each spawn_family task runs
LIFETIME = 90  # every task child exits by itself after this
COMMAND_TIMEOUT = 60
ATTACHED = ("plain", "plain_grandparent", "plain_grandchild")
DETACHED = ("nohup", "setsid", "setsid_grandchild")
SIDES = ("ours", "old")
#: What run() gives per side: one list per key, one entry per repeat.
KEYS = ("seconds", "save_seconds", "kill_seconds", "stop_seconds", "main_sigkilled", "attached", "attached_left",
        "left_by_role", "detached", "detached_killed", "saved", "saved_alive", "kill_exit", "kill_stderr")

# The old workaround's "savepid", as users wrote it (a Django command or a
# script): the worker_pid of every active task, space-separated, for
# `kill -9 $(cat FILE)`. Run from the project folder, like `celery -A`.
OLD_SAVEPID = """\
import os, sys
sys.path.insert(0, os.getcwd())
from demo.celery import app
active = app.control.inspect().active() or {}
pids = sorted({task["worker_pid"] for tasks in active.values() for task in tasks if task.get("worker_pid")})
with open(sys.argv[1], "w") as f:
    f.write(" ".join(map(str, pids)) + "\\n")
"""
OLD_KILL = 'kill -9 $(cat "$1")'

# Bounds supervisord's life: TERM (a clean shutdown: it stops the worker)
# after argv[2] seconds, KILL 30 s later. It holds a pidfd, so it signals
# that very supervisord or nobody, and exits as soon as supervisord does.
WATCHDOG = """
import os, select, signal, sys
fd = os.pidfd_open(int(sys.argv[1]))
for sig, wait in ((signal.SIGTERM, float(sys.argv[2])), (signal.SIGKILL, 30.0)):
    if select.select([fd], [], [], wait)[0]:
        break
    signal.pidfd_send_signal(fd, sig)
"""


def _harness():
    """The tests' real-process helpers (tests/ is not a package)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import realprocs
    import realsupervisor

    return realprocs, realsupervisor


def summary(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _command(argv, sup, timeout=COMMAND_TIMEOUT):
    """Run *argv* from the project folder with supervisord's environment; (seconds, CompletedProcess)."""
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=sup.project_dir, env=sup.env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - began, done


def _save(side, sup, path: Path, old_script: Path):
    if side == "ours":
        argv = [CELERY_SUPERVISE, "-A", "demo", "savepid", str(path),
                "--supervisor-url", f"unix://{sup.socket}", "--program", f"{PROGRAM}:*"]
    else:
        argv = [sys.executable, str(old_script), str(path)]
    seconds, done = _command(argv, sup)
    if done.returncode != 0:
        raise RuntimeError(f"{side} save: {' '.join(argv)} exited with {done.returncode}: {done.stderr[-2000:]}")
    return seconds, _saved_pids(side, path)


def _saved_pids(side, path: Path) -> list[int]:
    """The PIDs the save wrote: every process of our record; the old file's worker_pids."""
    if side == "ours":
        record = json.loads(path.read_text())
        return [p["pid"] for w in record.get("workers", ()) for p in w.get("procs", ())]
    return [int(word) for word in path.read_text().split()]


def _live(pids) -> int:
    """How many of *pids* name a running process (not a zombie)."""
    realprocs, _ = _harness()
    count = 0
    for pid in pids:
        try:
            count += not realprocs.is_gone(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return count


def _kill(side, sup, path: Path):
    if side == "ours":
        argv = [CELERY_SUPERVISE, "-A", "demo", "kill", str(path), "--grace", f"{GRACE:g}"]
    else:
        argv = ["sh", "-c", OLD_KILL, "sh", str(path)]
    seconds, done = _command(argv, sup)
    # Not an error for the old side: its PIDs are usually gone ("No such process").
    return seconds, done.returncode, done.stderr.strip()


def _roles(main, pools, markers):
    """({role: [psutil.Process]} that should die, [psutil.Process] that should survive)."""
    attached = {"main": [main], "pool": pools,
                "task": [psutil.Process(m["children"][r]) for m in markers for r in ATTACHED]}
    detached = [psutil.Process(m["children"][r]) for m in markers for r in DETACHED]
    return attached, detached


def _one(side: str, sup, directory: Path, old_script: Path, tracked: list) -> dict:
    """One scenario: two families running, save, stop, kill; what is left."""
    realprocs, _ = _harness()
    sup.wait_ready()
    [main_pid] = sup.group_pids(PROGRAM).values()
    main = psutil.Process(main_pid)
    task_ids = [sup.celery.spawn_family(hold=HOLD, lifetime=LIFETIME) for _ in range(2)]
    markers = [sup.celery.wait_for_marker(t) for t in task_ids]
    pools = {m["pool_pid"]: psutil.Process(m["pool_pid"]) for m in markers}
    for child in main.children():  # any idle pool process too (none with -c 2 and two tasks)
        pools.setdefault(child.pid, child)
    attached, detached = _roles(main, list(pools.values()), markers)
    everything = [p for ps in attached.values() for p in ps] + detached
    tracked.extend(everything)
    try:
        path = directory / ("state.json" if side == "ours" else "celery-worker-pid.txt")
        save_seconds, saved = _save(side, sup, path, old_script)
        began = time.perf_counter()
        stop = sup.ctl("stop", f"{PROGRAM}:*")
        stop_seconds = time.perf_counter() - began
        if stop.returncode != 0:
            raise RuntimeError(f"supervisorctl stop: {stop.stdout}{stop.stderr}")
        killed_main = f"killing '{PROGRAM}_0' ({main_pid}) with SIGKILL" in sup.log()
        saved_alive = _live(saved)
        kill_seconds, kill_code, kill_stderr = _kill(side, sup, path)
        # kill -9 returns once the signals are queued; give them SETTLE seconds.
        realprocs.wait_gone([p for ps in attached.values() for p in ps], SETTLE)
        left = {role: sum(not realprocs.is_gone(p) for p in ps) for role, ps in attached.items()}
        detached_killed = sum(realprocs.is_gone(p) for p in detached)
    finally:
        # The old side's leftovers, the detached children, anything a failure left.
        realprocs.reap(sorted(everything, key=_create_time, reverse=True))
    started = sup.ctl("start", f"{PROGRAM}:*")
    if started.returncode != 0:
        raise RuntimeError(f"cannot start the worker again: {started.stdout}{started.stderr}")
    return {
        "seconds": save_seconds + kill_seconds,
        "save_seconds": save_seconds,
        "kill_seconds": kill_seconds,
        "stop_seconds": stop_seconds,
        "main_sigkilled": killed_main,
        "attached": sum(len(ps) for ps in attached.values()),
        "attached_left": sum(left.values()),
        "left_by_role": left,
        "detached": len(detached),
        "detached_killed": detached_killed,
        "saved": len(saved),
        "saved_alive": saved_alive,
        "kill_exit": kill_code,
        "kill_stderr": kill_stderr[-300:],
    }


def _create_time(proc):
    try:
        return proc.create_time()
    except psutil.Error:
        return 0.0


def run(repeats: int = 5) -> dict:
    """Both sides, *repeats* times each, alternating; plain data.

    Returns ``{"repeats", "grace", "stopwaitsecs", "settle", "ours": SIDE, "old": SIDE}``
    where SIDE maps each key below to a list with one entry per repeat:
    ``seconds`` (save + kill), ``save_seconds``, ``kill_seconds``,
    ``stop_seconds``, ``main_sigkilled`` (supervisord logged the SIGKILL),
    ``attached`` (how many should die: main, pools, attached task
    children), ``attached_left``, ``left_by_role`` (``{"main", "pool",
    "task"}`` counts), ``detached`` (how many should survive),
    ``detached_killed``, ``saved`` (processes in our record; PIDs in the old
    file), ``saved_alive`` (how many of those were still running, zombies
    excluded, when the stop had returned), ``kill_exit``, ``kill_stderr``.
    """
    realprocs, realsupervisor = _harness()
    run_id = f"old-script-bench-{uuid.uuid4().hex}"
    out = {"repeats": repeats, "grace": GRACE, "stopwaitsecs": STOPWAITSECS, "settle": SETTLE,
           **{side: {k: [] for k in KEYS} for side in SIDES}}
    workdir = Path(tempfile.mkdtemp(prefix="old-script-bench-"))
    tracked: list[psutil.Process] = []
    sup = watchdog = None
    try:
        # A copy of the demo project: no scan by anybody else's tool run
        # finds our worker as "a worker of this project", nor ours theirs.
        project = realsupervisor.copy_project(workdir / "project")
        old_script = workdir / "old_savepid.py"
        old_script.write_text(OLD_SAVEPID)
        sup = realsupervisor.Supervisord(
            workdir / "supervisor", stopsignal="TERM", stopwaitsecs=STOPWAITSECS, concurrency=2,
            project_dir=project,
            # Our own kill lock: another session's kill must not hold ours up.
            env={realprocs.RUN_ENV_VAR: run_id, "CELERY_SUPERVISE_LOCK": str(workdir / "reaper.lock")})
        sup.env.pop("CELERY_BROKER_URL", None)  # Celery reads it first: keep the surroundings' broker out
        sup.start()
        watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(sup.pid), str(120 + 90 * repeats)],
                                    env=sup.env, stdin=subprocess.DEVNULL)
        for i in range(repeats):
            for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                directory = workdir / f"{side}-{i}"
                directory.mkdir(mode=0o700)
                one = _one(side, sup, directory, old_script, tracked)
                for k in KEYS:
                    out[side][k].append(one[k])
                print(f"old script bench: {side} {i + 1}/{repeats}: save+kill {one['seconds']:.2f} s, "
                      f"attached left {one['attached_left']}/{one['attached']} {one['left_by_role']}, "
                      f"detached killed {one['detached_killed']}/{one['detached']}", file=sys.stderr, flush=True)
    finally:
        try:
            if sup is not None:
                sup.stop()
        finally:
            if watchdog is not None:
                if watchdog.poll() is None:
                    watchdog.kill()
                watchdog.wait(timeout=10)
            realprocs.reap(sorted(tracked, key=_create_time, reverse=True))
            leaked = realprocs.reap_leaks(run_id, exclude={os.getpid()})
            if leaked:
                print(f"old script bench: {leaked}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwind, so that every finally kills what it started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/old_script_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="scenarios per side (default 5)")
    parser.add_argument("--json", action="store_true", help="print run()'s result as JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.measure import bytecode_cache_on

    bytecode_cache_on()
    res = run(args.repeats)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"old workaround vs celery-supervise, {res['repeats']} stop(s) each: worker -c 2 running two spawn_family "
          f"tasks, stopwaitsecs={res['stopwaitsecs']:g} (the stop SIGKILLs its main process)")
    labels = {"ours": f"savepid, stop, kill --grace {res['grace']:g}", "old": "inspect().active(), stop, kill -9"}
    rows = [("", "", "save + kill", "save", "kill", f"attached alive {res['settle']:g} s after",
             "detached killed", "PIDs saved (running at kill)")]
    for side in SIDES:
        r = res[side]
        s, save, kill = summary(r["seconds"]), summary(r["save_seconds"]), summary(r["kill_seconds"])
        rows.append((side, labels[side], f"{s['median']:.2f} s ({s['min']:.2f}–{s['max']:.2f})",
                     f"{save['median'] * 1000:.0f} ms", f"{kill['median'] * 1000:.0f} ms",
                     f"{' '.join(map(str, r['attached_left']))} of {max(r['attached'])}",
                     f"{' '.join(map(str, r['detached_killed']))} of {max(r['detached'])}",
                     " ".join(f"{n} ({a})" for n, a in zip(r["saved"], r["saved_alive"]))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
