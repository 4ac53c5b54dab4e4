"""Run the benchmarks side by side and print one markdown table.

    python bench/run.py [--quick] [--only snapshot|kill|savepid]

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
from bench.measure import Row, Target, table  # noqa: E402

BENCHMARKS = {
    "snapshot": lambda run_id, args: snapshot_cost.run(run_id, args.quick),
    "kill": lambda run_id, args: kill_cost.run(run_id, args.quick),
    "savepid": lambda run_id, args: savepid_vs_inspect.run(run_id, args.quick, args.project_wait),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, Redis only (under ~2 minutes)")
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
