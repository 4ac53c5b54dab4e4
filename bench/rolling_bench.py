"""The longest task pickup latency during a restart: ``restart --rolling`` vs plain ``restart`` vs ``supervisorctl``.

    python bench/rolling_bench.py [--quick] [--brokers filesystem,redis] [--task-seconds 5] [--repeats 5]

One supervisord (the tests' harness, ``tests/realsupervisor.py``) runs the
demo worker with ``numprocs=3`` (``-c 2`` each, ``stopsignal=TERM``) from a
private copy of ``django_app/``. Every worker consumes a shared queue and
one of its own. On each broker, each command restarts the group,
alternating run by run (bench/measure.py's ``order``):

* ``celery-supervise restart celery-worker --rolling`` (one process at a time);
* ``celery-supervise restart celery-worker`` (all drained, then all replaced);
* ``supervisorctl restart 'celery-worker:*'``.

Each is measured **idle** and **busy** (a ``mark`` task of
``--task-seconds`` running on each worker when the restart begins). Before
each restart every worker also runs a ``spawn_family`` task that returns at
once, leaving three attached and three detached children.

A probe (``mark``, no hold) is sent to the shared queue every 0.1 s from
just before the command to 1 s after it returns. The figure is the
**longest pickup latency**: the longest wait of any probe from its send to
its start (the ``started`` stamp the task writes, both wall-clock times on
this host). Each run also counts the probes lost (no ``done`` stamp 30 s
after the command), the **orphans left** (attached children of the old
workers still alive after the command) and the **detached killed**.

Measurements, not tests: nothing is asserted. Everything started is marked
with ``CELERY_SUPERVISE_TEST_RUN``; the families' children are killed by
PID (identity-checked by psutil) after each run, supervisord is shut down,
and a final sweep by the mark reaps any leftover.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the harness lives with the tests

from bench.measure import MIN_N_RESTART, bytecode_cache_on, load_average, order, purge_redis  # noqa: E402

#: Redis db 3 is the rolling restart's own (tests and this benchmark).
REDIS_URL = os.environ.get("BENCH_ROLLING_REDIS_URL", "redis://127.0.0.1:6379/3")
BROKERS = {"filesystem": None, "redis": REDIS_URL}
NUMPROCS = 3
PROBE_EVERY = 0.1
PROBE_AFTER = 1.0
TOOLS = ("rolling", "plain", "supervisorctl")
LABELS = {"rolling": "celery-supervise restart --rolling", "plain": "celery-supervise restart",
          "supervisorctl": "supervisorctl restart 'celery-worker:*'"}
#: The issue's targets: the longest pickup latency.
TARGET_SECONDS = 1.5
TARGET_RATIO = 0.3


class Probes(threading.Thread):
    """Sends a ``mark`` to *queue* every 0.1 s until stopped; remembers each send's wall-clock time."""

    def __init__(self, client, queue):
        super().__init__(daemon=True)
        self.client, self.queue = client, queue
        self.sent: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(PROBE_EVERY):
            at = time.time()
            self.sent[self.client.mark(queue=self.queue)] = at

    def stop(self):
        self.halt.set()
        self.join(10)


def _command(tool: str, run, project: Path) -> subprocess.CompletedProcess:
    if tool == "supervisorctl":
        return run.ctl("restart", "celery-worker:*", timeout=180)
    extra = ["--rolling"] if tool == "rolling" else []
    return subprocess.run(
        [sys.executable, "-m", "celery_supervise", "-A", "demo", "restart", "celery-worker",
         "-c", str(run.conf_path), "--grace", "3", "--drain-timeout", "60", "--json", *extra],
        cwd=project, env=run.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )


def _families(run, queue_of) -> list[dict]:
    """A finished ``spawn_family`` on each worker: its children, as psutil processes by role."""
    import psutil

    ids = [run.celery.spawn_family(hold=0, lifetime=300, queue=queue_of(n)) for n in range(NUMPROCS)]
    out = []
    for task in ids:
        marker = run.celery.wait_for_marker(task, timeout=60)
        procs = {}
        for role, pid in marker["children"].items():
            try:
                procs[role] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass
        out.append(procs)
    return out


def one(run, project: Path, tool: str, scenario: str, q: str, task_seconds: float) -> dict:
    """One restart by *tool*; the row's figures."""
    from realprocs import WaitTimeout, reap
    from taskfamily import ATTACHED, DETACHED, alive

    families = _families(run, lambda n: f"{q}-{n}")
    tasks = []
    if scenario == "busy":
        tasks = [run.celery.mark(hold=task_seconds, queue=f"{q}-{n}") for n in range(NUMPROCS)]
        for t in tasks:
            run.celery.wait_for_mark(t, "started", timeout=60)
    probes = Probes(run.celery, q)
    probes.start()
    time.sleep(PROBE_EVERY * 3)  # a few probes before the command, as a baseline
    start = time.monotonic()
    try:
        result = _command(tool, run, project)
        total = time.monotonic() - start
        time.sleep(PROBE_AFTER)
    finally:
        probes.stop()
    lost = []
    latencies = []
    deadline = time.monotonic() + 30
    for task, sent in probes.sent.items():
        try:
            run.celery.wait_for_mark(task, "done", timeout=max(0.05, deadline - time.monotonic()))
        except WaitTimeout:
            lost.append(task)
            continue
        latencies.append(run.celery.mark_record(task, "started")["time"] - sent)
    for t in tasks:
        if run.celery.mark_record(t, "done") is None:
            lost.append(t)
    orphans = sum(alive(f[r]) for f in families for r in ATTACHED if r in f)
    detached_killed = sum(not alive(f[r]) for f in families for r in DETACHED if r in f)
    reap([p for f in families for p in f.values()])  # identity-checked by psutil
    row = {"tool": tool, "scenario": scenario, "ok": result.returncode == 0, "total": total,
           "longest": max(latencies) if latencies else None, "probes": len(probes.sent), "lost": len(lost),
           "orphans": orphans, "detached_killed": detached_killed}
    if tool != "supervisorctl":
        try:
            doc = json.loads(result.stdout)
            row["problem"] = doc.get("problem")
        except ValueError:
            row["problem"] = result.stderr.strip()[-200:]
    return row


def measure(broker: str, task_seconds: float, repeats: int, scenarios=("idle", "busy")) -> list[dict]:
    from realsupervisor import Supervisord, copy_project

    url = BROKERS[broker]
    uid = uuid.uuid4().hex[:8]
    q = f"rollbench-{uid}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="rolling-bench-") as tmp:
        project = copy_project(Path(tmp) / "project")
        (Path(tmp) / "sup").mkdir()
        run = Supervisord(Path(tmp) / "sup", numprocs=NUMPROCS, concurrency=2,
                          stopwaitsecs=int(max(10, task_seconds + 10)), project_dir=project, broker_url=url,
                          queues=f"{q},{q}-%(process_num)d", node_prefix=f"rollbench{uid}-")
        try:
            run.start()
            run.wait_nodes()
            plan = [(tool, scenario) for i in range(repeats) for scenario in scenarios for tool in order(i, TOOLS)]
            for tool, scenario in plan:
                load = load_average()
                row = one(run, project, tool, scenario, q, task_seconds)
                row.update(broker=broker, load=load)
                rows.append(row)
                print(f"rolling_bench: {broker} {scenario} {tool}: longest pickup "
                      f"{row['longest'] if row['longest'] is None else round(row['longest'], 2)} s, "
                      f"lost {row['lost']}, orphans {row['orphans']}, detached killed {row['detached_killed']}, "
                      f"load {load:.2f}", file=sys.stderr, flush=True)
                run.wait_nodes()
        finally:
            run.stop()
            if url:
                purge_redis(REDIS_URL, uid)
    return rows


def run(brokers=("filesystem", "redis"), task_seconds: float = 5.0, repeats: int = 5) -> list[dict]:
    """Measure on each broker; every process started is gone when it returns."""
    from realprocs import RUN_ENV_VAR, reap_leaks

    mark = os.environ.setdefault(RUN_ENV_VAR, "rolling-bench-" + uuid.uuid4().hex)
    os.environ.pop("CELERY_BROKER_URL", None)
    try:
        return [row for b in brokers for row in measure(b, task_seconds, repeats)]
    finally:
        leaked = reap_leaks(mark, exclude={os.getpid()})
        if leaked:
            print(f"rolling_bench: {leaked}", file=sys.stderr)


def rows_for_table(results: list[dict], brokers, task_seconds: float):
    """bench/run.py's rows: rolling vs supervisorctl (the target), and plain restart as a note."""
    from bench.measure import Row, Target, summary

    out = []
    for broker in brokers:
        for scenario in ("idle", "busy"):
            side = {tool: [r for r in results if (r["broker"], r["scenario"], r["tool"]) == (broker, scenario, tool)]
                    for tool in TOOLS}
            what = "idle" if scenario == "idle" else f"a {task_seconds:g} s task on each worker"
            row = Row(f"longest probe pickup during a restart, numprocs={NUMPROCS}, {broker}, {what}",
                      LABELS["rolling"], LABELS["supervisorctl"], Target(seconds=TARGET_SECONDS, ratio=TARGET_RATIO),
                      ours=[r["longest"] for r in side["rolling"] if r["longest"] is not None],
                      baseline=[r["longest"] for r in side["supervisorctl"] if r["longest"] is not None],
                      min_n=MIN_N_RESTART)
            plain = [r["longest"] for r in side["plain"] if r["longest"] is not None]
            row.notes.append(f"plain `celery-supervise restart`: {summary(plain) if plain else '-'}")
            row.notes.append("; ".join(
                f"{tool}: probes lost {sum(r['lost'] for r in rs)}, orphans left {sum(r['orphans'] for r in rs)}, "
                f"detached killed {sum(r['detached_killed'] for r in rs)}, failed runs {sum(not r['ok'] for r in rs)}"
                for tool, rs in side.items()))
            out.append(row)
    return out


def table(rows: list[dict]) -> str:
    def s(v):
        return "-" if v is None else f"{v:.2f} s"

    lines = ["| broker | worker | command | longest pickup | whole restart | probes | lost | orphans left "
             "| detached killed | exit ok | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['broker']} | {r['scenario']} | {LABELS[r['tool']]} | {s(r['longest'])} | {s(r['total'])} "
                     f"| {r['probes']} | {r['lost']} | {r['orphans']} | {r['detached_killed']} "
                     f"| {'yes' if r['ok'] else 'NO'} | {r['load']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/rolling_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="filesystem,redis", help="comma list of filesystem, redis")
    parser.add_argument("--task-seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=None, help="restarts per command and worker state "
                        f"(default 5; {MIN_N_RESTART} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"{MIN_N_RESTART} repeats")
    args = parser.parse_args(argv)
    bytecode_cache_on()
    brokers = tuple(b for b in args.brokers.split(",") if b)
    repeats = args.repeats or (MIN_N_RESTART if args.quick else 5)
    results = run(brokers, args.task_seconds, repeats)
    print(table(results))
    from bench.measure import table as summary_table

    print()
    print(summary_table(rows_for_table(results, brokers, args.task_seconds)))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
