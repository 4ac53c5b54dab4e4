"""Run every benchmark and print one markdown table.

    python bench/run.py [--quick] [--only snapshot|kill|savepid|listener|listener-idle|drain|drain-all|storm|restart|rolling|oldscript]

Each row gives our figure, the figure of what a user would otherwise use
(psutil, raw ``os.kill``, ``celery inspect``, ``supervisorctl restart``,
the old "save worker_pids, then ``kill -9``" script) or of the floor (the
shortest Python that makes the same broker round trips), their ratio, the
target and whether it was met. Every row has N ≥ 5 samples a side (restart
rows N ≥ 3), the sides alternate run by run, the header gives the load
average before and after, and a row whose min–max ranges overlap says so
instead of claiming a win (bench/measure.py).

These are measurements, not tests: a MISS is reported, never raised. Each
benchmark starts its own processes, with bounded lifetimes, and kills and
reaps them by PID when it ends; a final sweep finds any leftover by the
run's mark in its environment (never by name) and kills it.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import uuid

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from bench import cgroup_cost, kill_cost, savepid_vs_inspect, snapshot_cost  # noqa: E402
from bench.forest import MARK_ENV  # noqa: E402
from bench.measure import (  # noqa: E402
    MIN_N_RESTART, Row, Target, bytecode_cache_on, load_average, median, summary, table,
)


def listener_rows(run_id: str, args) -> list[Row]:
    from bench import listener_bench

    lat = listener_bench.latency(5 if args.quick else 7)
    latency = Row(f"listener: supervisord's 'stopped' log line → last attached leftover gone (--grace {lat['grace']:g})",
                  "eventlistener", "savepid + supervisorctl stop + kill", Target(seconds=lat["target"]),
                  ours=lat["ours"], baseline=lat["baseline"])
    latency.notes.append("negative: the leftovers were gone before supervisord logged the stop (the listener "
                         "reaps on the worker's exit, through a pidfd)")
    if lat["clock_steps"]:
        latency.notes.append(f"{lat['clock_steps']} stop(s) measured again: the wall clock was set meanwhile")
    events = 2_000 if args.quick else 10_000
    runs = [listener_bench.rss(events) for _ in range(5)]
    peaks = [max(s["rss"] for s in r["samples"]) / 2**20 for r in runs]
    rss = Row(f"listener RSS, peak over {events:,} events, one listener per run", "celery-supervise listener", "-",
              Target(seconds=runs[0]["target"] / 2**20, unit="MB"), ours=peaks, unit="MB")
    growth = [(r["samples"][-1]["rss"] - r["samples"][0]["rss"]) / 2**20 for r in runs]
    rss.notes.append("growth from the first to the last sample of each run: "
                     + ", ".join(f"{g:+.1f} MB" for g in growth)
                     + f"; exit codes at end of input {[r['exit_code'] for r in runs]}")
    return [latency, rss]


def listener_idle_rows(run_id: str, args) -> list[Row]:
    from bench import listener_idle

    seconds = args.idle_seconds or (listener_idle.QUICK_SECONDS if args.quick else listener_idle.SECONDS)
    results = listener_idle.run(listener_idle.WORKERS, seconds, listener_idle.WINDOWS)
    return listener_idle.rows(results, seconds, listener_idle.WINDOWS, seconds < listener_idle.SECONDS)


def drain_rows(run_id: str, args) -> list[Row]:
    from bench import drain_bench

    rows = []
    for broker, sides in drain_bench.run(("redis",) if args.quick else ("filesystem", "redis"),
                                         5 if args.quick else 7).items():
        overhead = Row(f"drain overhead, {broker}: last task done → command exits",
                       "celery-supervise drain", "cancel_consumer + `celery inspect active` loop",
                       Target(seconds=drain_bench.TARGET), ours=sides["ours"], baseline=sides["baseline"])
        if sides["clock_steps"]:
            overhead.notes.append(f"{sides['clock_steps']} sample(s) taken again: the wall clock was set meanwhile "
                                  "(the task's done stamp is wall-clock time)")
        rows.append(overhead)
        round_trip = median(sides["rounds"])
        floor = Row(f"drain's decision vs the floor, {broker}: last task done → drained decided",
                    "celery-supervise drain (its result's finished_at)",
                    "python -c: import the app, cancel, reserved + active rounds until empty",
                    Target(seconds=drain_bench.POLL_INTERVAL + round_trip), ours=sides["ours_decided"],
                    baseline=sides["floor_decided"])
        floor.notes.append(f"target: one poll interval ({drain_bench.POLL_INTERVAL:g} s) + one round trip "
                           f"(reserved + active, the floor's median round: {round_trip * 1000:.1f} ms over "
                           f"{len(sides['rounds'])} rounds)")
        floor.notes.append(f"to the process's exit instead: ours {summary(sides['ours'])}, "
                           f"floor {summary(sides['floor'])} (both then pay Python's shutdown after Celery and "
                           f"Django were loaded, 0.1 s or more)")
        cpu = Row(f"drain vs the floor, {broker}: CPU (user+sys) of the whole command", "celery-supervise drain",
                  "the same floor", Target(), ours=sides["ours_cpu"], baseline=sides["floor_cpu"])
        cpu.notes.append(f"both poll at one round per {drain_bench.POLL_INTERVAL:g} s while the {drain_bench.HOLD:g} s "
                         "task runs")
        rows += [floor, cpu]
    return rows


def drain_all_rows(run_id: str, args) -> list[Row]:
    from bench import drain_all_bench

    rows = []
    for n, res in drain_all_bench.run(drain_all_bench.WORKERS, 5 if args.quick else 7).items():
        target = Target(seconds=drain_all_bench.TARGET) if n == max(drain_all_bench.WORKERS) else Target()
        row = Row(f"drain --all overhead, {n} worker(s) (-c 1), redis: last task done → command exits",
                  "celery-supervise drain --all", "cancel_consumer + `celery inspect active` loop (no -d)", target,
                  ours=res["ours"], baseline=res["baseline"])
        c = res["count"]
        row.notes.append(
            f"broadcasts in one counted drain --all: {c['broadcasts']} ({c['cancels']} cancel_consumer, 1 active_queues, "
            f"{c['rounds']} reserved + active rounds while the {drain_all_bench.HOLD:g} s tasks ran); after the last task: "
            f"{c['broadcasts_after_last_task']} broadcast(s), {c['replies']} replies in all, decided "
            f"{c['decided_after_last_task'] * 1000:.0f} ms after it")
        if res["clock_steps"]:
            row.notes.append(f"{res['clock_steps']} sample(s) taken again: the wall clock was set meanwhile")
        rows.append(row)
    return rows


def storm_rows(run_id: str, args) -> list[Row]:
    from bench import storm_bench

    runs = storm_bench.run(storm_bench.WORKERS, MIN_N_RESTART)
    n = storm_bench.WORKERS
    latency = Row(f"event storm: `supervisorctl restart all` of {n} workers + the listener, last 'stopped' → "
                  "last attached leftover gone", "eventlistener", "-", Target(), ours=[r["latency"] for r in runs],
                  min_n=MIN_N_RESTART)
    latency.notes.append(
        f"buffer_size {runs[0]['buffer_size']} (print-config's for --numprocs {n}); events handed to the listener per "
        f"restart: {[r['events'] for r in runs]}, discarded: {[r['discarded'] for r in runs]}; attached left: "
        f"{[r['left'] for r in runs]}, detached killed: {[r['detached_killed'] for r in runs]}; restart all took "
        + ", ".join(f"{r['restart']:.1f} s" for r in runs))
    latency.notes.append("restart all stops the listener too, first: the new one, started once every worker has "
                         "stopped, reaps the old trees from its records")
    stepped = sum(r["clock_stepped"] for r in runs)
    if stepped:
        latency.notes.append(f"{stepped} storm(s) saw the wall clock set meanwhile: their latency is not meaningful")
    rss = Row(f"event storm: listener RSS, peak over `restart all` of {n} workers", "celery-supervise listener", "-",
              Target(), ours=[r["rss"] / 2**20 for r in runs], unit="MB", min_n=MIN_N_RESTART)
    return [latency, rss]


def restart_rows(run_id: str, args) -> list[Row]:
    from bench import restart_bench

    brokers = ("redis",) if args.quick else ("filesystem", "redis")
    results = restart_bench.run(brokers, 5.0, MIN_N_RESTART if args.quick else 5)
    rows = []
    for broker in brokers:
        for scenario in ("idle", "busy"):
            mine = [r for r in results if (r["broker"], r["scenario"], r["tool"]) == (broker, scenario, "celery-supervise")]
            theirs = [r for r in results if (r["broker"], r["scenario"], r["tool"]) == (broker, scenario, "supervisorctl")]
            startup = [r["startup"] for r in mine if r.get("startup") is not None]
            target = Target(seconds=median(startup) + 0.5) if startup else Target()
            row = Row(f"restart consume gap, {broker}, {'idle' if scenario == 'idle' else 'a 5 s task running'}",
                      "celery-supervise restart", "supervisorctl restart", target,
                      ours=[r["gap"] for r in mine if r["gap"] is not None],
                      baseline=[r["gap"] for r in theirs if r["gap"] is not None], min_n=MIN_N_RESTART)
            row.notes.append(
                "target: the new worker's own start-up (median of " + ", ".join(f"{s:.2f} s" for s in startup)
                + ") + 0.5 s; "
                + "; ".join(f"{tool}: {sum(r['lost'] for r in rs)} task(s) lost, "
                            f"{sum(len(r['orphans']) for r in rs)} orphan(s), "
                            f"{sum(not r['ok'] for r in rs)} failed run(s)"
                            for tool, rs in (("ours", mine), ("supervisorctl", theirs))))
            rows.append(row)
    return rows


def rolling_rows(run_id: str, args) -> list[Row]:
    from bench import rolling_bench

    brokers = ("redis",) if args.quick else ("filesystem", "redis")
    results = rolling_bench.run(brokers, 5.0, MIN_N_RESTART if args.quick else 5)
    return rolling_bench.rows_for_table(results, brokers, 5.0)


def oldscript_rows(run_id: str, args) -> list[Row]:
    from bench import old_script_bench

    res = old_script_bench.run(5 if args.quick else 7)
    ours, old = res["ours"], res["old"]
    ours_label = f"savepid + kill --grace {res['grace']:g}"
    old_label = "inspect().active() → file, kill -9 $(cat file)"
    timing = Row("old workaround: save + kill wall time (stop not counted)", ours_label, old_label,
                 Target(ratio=1.0), ours=ours["seconds"], baseline=old["seconds"])
    left = Row(f"old workaround: attached processes alive {res['settle']:g} s after the kill "
               f"(of {max(ours['attached'])})", ours_label, old_label, Target(seconds=0, unit=""), unit="",
               ours=[float(n) for n in ours["attached_left"]], baseline=[float(n) for n in old["attached_left"]])
    spared = Row(f"old workaround: detached processes killed (of {max(ours['detached'])})", ours_label, old_label,
                 Target(seconds=0, unit=""), unit="",
                 ours=[float(n) for n in ours["detached_killed"]], baseline=[float(n) for n in old["detached_killed"]])
    left.notes.append(f"old: the file holds the busy pool processes' PIDs only ({old['saved'][0]} PIDs, "
                      f"{old['saved_alive'][0]} still running after the stop)")
    return [timing, left, spared]


BENCHMARKS = {
    "snapshot": lambda run_id, args: snapshot_cost.run(run_id, args.quick),
    "cgroup": lambda run_id, args: cgroup_cost.run(run_id, args.quick),
    "kill": lambda run_id, args: kill_cost.run(run_id, args.quick),
    "savepid": lambda run_id, args: savepid_vs_inspect.run(run_id, args.quick, args.project_wait),
    "listener": listener_rows,
    "listener-idle": listener_idle_rows,
    "drain": drain_rows,
    "drain-all": drain_all_rows,
    "storm": storm_rows,
    "restart": restart_rows,
    "rolling": rolling_rows,
    "oldscript": oldscript_rows,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, Redis only")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--project-wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for django_app/demo to exist (default 60)")
    parser.add_argument("--idle-seconds", type=float, default=None, metavar="SECONDS",
                        help="listener-idle: idle time per worker count (default 300; 60 with --quick)")
    return parser.parse_args(argv)


def sweep(run_id: str) -> list[str]:
    """Kill, by PID, any live process still carrying this run's mark."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(MARK_ENV) == run_id and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    for p in found:
        try:
            p.kill()  # psutil re-checks the creation time first
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(found, timeout=5)
    return [f"{p.pid}" for p in found]


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwind, so every finally kills what it started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    bytecode_cache_on()
    run_id = uuid.uuid4().hex
    names = args.only or list(BENCHMARKS)
    rows: list[Row] = []
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        for name in names:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            before = load_average()
            try:
                new = BENCHMARKS[name](run_id, args)
            except Exception as exc:  # one broken benchmark must not hide the others
                new = [Row(name, "-", "-", Target(), skipped=f"{type(exc).__name__}: {exc}")]
            after = load_average()
            for row in new:
                row.load = row.load or (before, after)
            rows.extend(new)
            print(f"bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        leftovers = sweep(run_id)
        if leftovers:
            print(f"bench: killed {len(leftovers)} leftover process(es): {' '.join(leftovers)}", file=sys.stderr)
    load_after = os.getloadavg()
    print(
        f"celery-supervise benchmarks ({'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, psutil {psutil.__version__})\n\n"
        f"load average (1, 5, 15 min) before: {_load(load_before)}; after: {_load(load_after)}. "
        f"Each row's last column: the 1-minute load average before and after its benchmark "
        f"(a kill of a 1,000-process tree raises it by itself: the dying processes are runnable).\n"
    )
    print(table(rows))
    return 0


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
