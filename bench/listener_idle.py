"""The eventlistener's idle cost: its CPU and memory while nothing happens.

    .venv/bin/python bench/listener_idle.py [--workers 1,8,32] [--seconds 300] [--windows 5] [--quick]

The listener runs for ever beside the workers: between events it holds a
pidfd of every worker it recorded, re-reads their trees every
``listener.REFRESH_INTERVAL`` seconds (2 s), and on every ``TICK_60`` sweeps
its state folder and re-records every running worker. What that costs when
nothing else happens is measured here, for 1, 8 and 32 workers.

For each worker count, one real supervisord (the tests' harness,
``tests/realsupervisor.py``) runs the demo worker with ``numprocs=N`` and
small pools (``-c 1``: a main and one pool process each) on Redis (database
7, ``BENCH_REDIS_URL``; queue and node names of the run's own, deleted at
the end), from a private copy of the demo project, with the listener
configured as ``conf/supervisord.conf`` does it (the harness's
``listener_section``). Not the filesystem transport: workers that start at
the same moment on one broker folder race on its exchange table (kombu
reads it while another writes it), and one of 8 or 32 then exits. Once every worker answers a ping and the listener
has a record of each, the listener is left alone for ``--seconds``
(default 300), cut into ``--windows`` equal windows (default 5). For each
window:

* **CPU**: the listener's ``utime + stime`` from ``/proc/PID/stat`` at the
  window's two ends, over the window's wall time, as a percentage of one
  core (CPU seconds per hour = that × 36). The verdict is on the whole
  run's average, not on the median window: a ``TICK_60`` falls in one
  window of five when they are shorter than a minute;
* **RSS**: ``VmRSS`` from ``/proc/PID/status`` at the window's end; the
  verdict is on the peak.

Targets: ≤ 0.5 % of one core and ≤ 45 MB at 32 workers (the rows of
smaller counts show the same targets). ``--quick`` measures 60 s in 5
windows of 12 s, and the row names say so: a 12 s window holds a
``TICK_60`` or not, so its figures scatter more. Measurements, not tests:
nothing is asserted.

Everything started carries the tests' run mark (``CELERY_SUPERVISE_TEST_RUN``,
with a value of its own) in its environment, supervisord is shut down at
the end of each count (it stops the workers and the listener), and a final
sweep by that mark kills, by PID, anything left.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
sys.path[:0] = [p for p in (str(REPO), str(TESTS)) if p not in sys.path]

from bench.measure import Row, Target, bytecode_cache_on, format_value, median  # noqa: E402

BIN = Path(sys.executable).parent
CELERY_SUPERVISE = str(BIN / "celery-supervise")
LISTENER = "celery-supervise"  # the harness's eventlistener section name
WORKERS = (1, 8, 32)
SECONDS = 300.0
WINDOWS = 5
QUICK_SECONDS = 60.0
CPU_TARGET = 0.5  # percent of one core
RSS_TARGET = 45.0  # MB
#: 32 workers starting at once on a small machine take a while.
READY_TIMEOUT = 600.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")


def cpu_ticks(pid: int) -> int:
    """utime + stime of *pid*, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # proc(5) fields 14 and 15


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _listener_pid(sup) -> int:
    pids = sup.group_pids(LISTENER)
    if len(pids) != 1:
        raise RuntimeError(f"the listener is not running: {sup.states()}")
    return next(iter(pids.values()))


def _records(sup) -> int:
    try:
        names = os.listdir(sup.dir / "state")
    except FileNotFoundError:
        return 0
    return sum(n.endswith(".json") and not n.endswith(".report.json") and not n.startswith(".") for n in names)


def measure(workers: int, seconds: float, windows: int, workdir: Path, project: Path) -> dict:
    """``{"workers", "cpu": [% per window], "rss": [MB per window], "window", "ticks", "startup"}``."""
    from realprocs import wait_for
    from realsupervisor import Supervisord, listener_section

    from brokers import clean_redis

    directory = workdir / f"workers-{workers}"
    directory.mkdir()
    uid = uuid.uuid4().hex[:8]
    extra = listener_section(CELERY_SUPERVISE, 10, project)
    sup = Supervisord(directory, numprocs=workers, concurrency=1, extra=extra, project_dir=project,
                      broker_url=REDIS_URL, queues=f"idle-{uid}", node_prefix=f"idle{uid}-",
                      env={"CELERY_SUPERVISE_LOCK": str(directory / "reaper.lock")})
    began = time.monotonic()
    try:
        sup.start()
        sup.wait_nodes(timeout=READY_TIMEOUT)
        wait_for(lambda: _records(sup) >= workers, READY_TIMEOUT, f"the listener's records of {workers} worker(s)",
                 interval=0.5)
        startup = time.monotonic() - began
        pid = _listener_pid(sup)
        time.sleep(5)  # let the last records' writes and the start sweep finish
        cpu, rss = [], []
        window = seconds / windows
        t0, c0 = time.monotonic(), cpu_ticks(pid)
        start_ticks = c0
        for k in range(1, windows + 1):
            time.sleep(max(0.0, t0 + k * window - time.monotonic()))
            now, ticks = time.monotonic(), cpu_ticks(pid)
            cpu.append(100.0 * (ticks - c0) / CLOCK_TICKS / (now - (t0 + (k - 1) * window)))
            rss.append(rss_mb(pid))
            c0 = ticks
        if _listener_pid(sup) != pid:
            raise RuntimeError("the listener restarted during the measurement")
        total = 100.0 * (c0 - start_ticks) / CLOCK_TICKS / (time.monotonic() - t0)
        return {"workers": workers, "cpu": cpu, "rss": rss, "window": window, "whole": total, "startup": startup,
                "records": _records(sup)}
    finally:
        try:
            sup.stop()
        finally:
            clean_redis(REDIS_URL, uid)


def run(workers=WORKERS, seconds: float = SECONDS, windows: int = WINDOWS) -> list[dict]:
    """Measure each worker count in turn; every process started is gone when it returns."""
    import realprocs
    from realsupervisor import copy_project

    mark = os.environ.setdefault(realprocs.RUN_ENV_VAR, f"listener-idle-{uuid.uuid4().hex}")
    os.environ.pop("CELERY_BROKER_URL", None)  # each supervisord sets its own
    workdir = Path(tempfile.mkdtemp(prefix="listener-idle-"))
    try:
        project = copy_project(workdir / "project")
        out = []
        for n in workers:
            print(f"listener idle: {n} worker(s), {seconds:g} s ...", file=sys.stderr, flush=True)
            out.append(measure(n, seconds, windows, workdir, project))
        return out
    finally:
        leaked = realprocs.reap_leaks(mark, exclude={os.getpid()})
        if leaked:
            print(f"listener idle: {leaked}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def rows(results: list[dict], seconds: float, windows: int, quick: bool) -> list[Row]:
    out = []
    how = f"{seconds:g} s in {windows} windows" + (" (--quick: less than the 5 minutes the target asks)" if quick else "")
    for r in results:
        n = r["workers"]
        label = "celery-supervise listener, idle"
        cpu = Row(f"listener idle CPU, {n} worker(s) under one supervisord, {how}", label, "-",
                  Target(seconds=CPU_TARGET, unit="%"), ours=r["cpu"], unit="%", judged=r["whole"],
                  judged_label="whole run (judged)")
        cpu.notes.append(f"the whole run: {format_value(r['whole'], '%')} of one core = "
                         f"{r['whole'] * 36:.1f} CPU seconds per hour (median window: "
                         f"{median(r['cpu']) * 36:.1f} s/h); one clock tick in a window is "
                         f"{format_value(100 / CLOCK_TICKS / r['window'], '%')}; {r['records']} record(s) held; "
                         f"supervisord start to every record written: {r['startup']:.0f} s")
        rss = Row(f"listener idle RSS, {n} worker(s), {how}", label, "-", Target(seconds=RSS_TARGET, unit="MB"),
                  ours=r["rss"], unit="MB", judged=max(r["rss"]), judged_label="peak (judged)")
        out += [cpu, rss]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/listener_idle.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default=",".join(map(str, WORKERS)), help="comma list of worker counts")
    parser.add_argument("--seconds", type=float, default=None, help=f"idle time per count (default {SECONDS:g})")
    parser.add_argument("--windows", type=int, default=WINDOWS, help=f"windows per count (default {WINDOWS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS:g} s per count")
    args = parser.parse_args(argv)
    bytecode_cache_on()
    seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    from bench.measure import table

    before = os.getloadavg()
    results = run(tuple(int(n) for n in args.workers.split(",") if n), seconds, args.windows)
    after = os.getloadavg()
    out = rows(results, seconds, args.windows, args.quick or seconds < SECONDS)
    for row in out:
        row.load = (before[0], after[0])
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{v:.2f}" for v in before)
          + "; after: " + ", ".join(f"{v:.2f}" for v in after) + "\n")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
