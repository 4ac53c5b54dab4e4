"""Run every benchmark and print one markdown table.

    python bench/run.py [--quick] [--only snapshot|kill|savepid|listener|drain|restart|oldscript]

Each row gives our figure, the figure of what a user would otherwise use
(psutil, raw ``os.kill``, ``celery inspect``, ``supervisorctl restart``,
the old "save worker_pids, then ``kill -9``" script), their ratio, the
target and whether it was met.

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

from bench import kill_cost, savepid_vs_inspect, snapshot_cost  # noqa: E402
from bench.forest import MARK_ENV  # noqa: E402
from bench.measure import Row, Target, median, table  # noqa: E402


def listener_rows(run_id: str, args) -> list[Row]:
    from bench import listener_bench

    lat = listener_bench.latency(2 if args.quick else 5)
    latency = Row(f"listener: supervisord's 'stopped' log line → last attached leftover gone (--grace {lat['grace']:g})",
                  "eventlistener", "savepid + supervisorctl stop + kill", Target(seconds=lat["target"]),
                  ours=lat["ours"], baseline=lat["baseline"])
    latency.notes.append("negative: the leftovers were gone before supervisord logged the stop (the listener "
                         "reaps on the worker's exit, through a pidfd)")
    res = listener_bench.rss(2_000 if args.quick else 10_000)
    mb = [s["rss"] / 2**20 for s in res["samples"]]
    rss = Row(f"listener RSS over {res['samples'][-1]['events']:,} events", "celery-supervise listener", "-",
              Target(seconds=res["target"] / 2**20, unit="MB"), ours=mb, unit="MB")
    rss.notes.append(f"growth from the first to the last sample: {mb[-1] - mb[0]:+.1f} MB; "
                     f"exit code at end of input {res['exit_code']}")
    return [latency, rss]


def drain_rows(run_id: str, args) -> list[Row]:
    from bench import drain_bench

    rows = []
    for broker, sides in drain_bench.run(("redis",) if args.quick else ("filesystem", "redis"),
                                         1 if args.quick else 3).items():
        rows.append(Row(f"drain overhead, {broker}: last task done → command exits",
                        "celery-supervise drain", "cancel_consumer + `celery inspect active` loop",
                        Target(seconds=drain_bench.TARGET), ours=sides["ours"], baseline=sides["baseline"]))
    return rows


def restart_rows(run_id: str, args) -> list[Row]:
    from bench import restart_bench

    brokers = ("redis",) if args.quick else ("filesystem", "redis")
    results = restart_bench.run(brokers, 5.0, 1 if args.quick else 2)
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
                      baseline=[r["gap"] for r in theirs if r["gap"] is not None])
            row.notes.append(
                "target: the new worker's own start-up (" + ", ".join(f"{s:.2f} s" for s in startup) + ") + 0.5 s; "
                + "; ".join(f"{tool}: {sum(r['lost'] for r in rs)} task(s) lost, "
                            f"{sum(len(r['orphans']) for r in rs)} orphan(s), "
                            f"{sum(not r['ok'] for r in rs)} failed run(s)"
                            for tool, rs in (("ours", mine), ("supervisorctl", theirs))))
            rows.append(row)
    return rows


def oldscript_rows(run_id: str, args) -> list[Row]:
    from bench import old_script_bench

    res = old_script_bench.run(2 if args.quick else 3)
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
    "kill": lambda run_id, args: kill_cost.run(run_id, args.quick),
    "savepid": lambda run_id, args: savepid_vs_inspect.run(run_id, args.quick, args.project_wait),
    "listener": listener_rows,
    "drain": drain_rows,
    "restart": restart_rows,
    "oldscript": oldscript_rows,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, Redis only")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--project-wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for django_app/demo to exist (default 60)")
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
    run_id = uuid.uuid4().hex
    names = args.only or list(BENCHMARKS)
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for name in names:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                rows.extend(BENCHMARKS[name](run_id, args))
            except Exception as exc:  # one broken benchmark must not hide the others
                rows.append(Row(name, "-", "-", Target(), skipped=f"{type(exc).__name__}: {exc}"))
            print(f"bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        leftovers = sweep(run_id)
        if leftovers:
            print(f"bench: killed {len(leftovers)} leftover process(es): {' '.join(leftovers)}", file=sys.stderr)
    print(
        f"celery-supervise benchmarks ({'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, psutil {psutil.__version__}, "
        f"load average {os.getloadavg()[0]:.2f})\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
