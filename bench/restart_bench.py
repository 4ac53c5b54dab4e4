"""``celery-supervise restart`` against ``supervisorctl restart``, on one worker.

    python bench/restart_bench.py [--brokers filesystem,redis] [--task-seconds 5]

One supervisord (the tests' harness, ``tests/realsupervisor.py``) runs the
demo worker (``-c 2``, ``stopsignal=TERM``) from a private copy of
``django_app/``. On each broker, each command restarts that program twice:
idle, then with a ``mark`` task of ``--task-seconds`` running.

The **consume gap** is how long the worker's queues had nobody taking a
task:

* ``celery-supervise restart``: its own ``consume_gap`` (the drain's cancels
  sent -> the new worker answers a ping);
* ``supervisorctl restart``: from the command's start (the stop signal makes
  a Celery worker cancel its consumers at once) to the new worker's first
  answer to a ping, sent with ``destination`` and ``limit`` every 0.25 s.

The target compares our gap with the new worker's own start-up time (from
supervisord's start to its first answer to a ping, as ``restart`` reports
it in ``new_nodes``): at most that plus 0.5 s.

Each row also says whether the task finished on the old worker, whether it
finished at all (a lost task is one with no ``done`` stamp 30 s after the
restart) and how many orphans were left: live processes started by this
run that are neither supervisord's descendants nor ours. Neither restart
loses the task here (TERM is a warm shutdown), but ``supervisorctl``
leaves a task's attached children behind; that is what ``kill`` is for and
is measured by the listener and soak benchmarks. Measurements, not tests:
nothing is asserted.
Everything started is marked with ``CELERY_SUPERVISE_TEST_RUN`` and stopped
through supervisord's shutdown, then swept by that mark, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the harness lives with the tests

from bench.measure import bytecode_cache_on, order, purge_redis  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
BROKERS = {"filesystem": None, "redis": REDIS_URL}
PING_EVERY = 0.25
TOOLS = ("celery-supervise", "supervisorctl")


def _ping_until_answered(client, node: str, deadline: float) -> float | None:
    """Monotonic time of *node*'s first answer to a ping, or ``None`` at the deadline."""
    while time.monotonic() < deadline:
        replies = client.app.control.ping(destination=[node], limit=1, timeout=PING_EVERY)
        if any(node in r for r in replies or ()):
            return time.monotonic()
    return None


def _supervisorctl(run, node: str) -> dict:
    start = time.monotonic()
    result = run.ctl("restart", "celery-worker:*")
    # The ctl returns once the new process is RUNNING (startsecs); the
    # worker answers a little later.
    answered = _ping_until_answered(run.celery, node, time.monotonic() + 60)
    return {"ok": result.returncode == 0, "total": time.monotonic() - start,
            "gap": None if answered is None else answered - start}


def _celery_supervise(run, project: Path) -> dict:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "celery_supervise", "-A", "demo", "restart", "celery-worker",
         "-c", str(run.conf_path), "--grace", "3", "--json"],
        cwd=project, env=run.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
    )
    total = time.monotonic() - start
    try:
        doc = json.loads(result.stdout)
    except ValueError:
        return {"ok": False, "total": total, "gap": None, "error": result.stderr.strip()[-200:]}
    startup = [s for s in doc["new_nodes"].values() if s is not None]
    return {"ok": result.returncode == 0, "total": total, "gap": doc["consume_gap"],
            "startup": max(startup) if startup else None,
            "phases": {p["name"]: round(p["seconds"], 2) for p in doc["phases"]}}


def measure(broker: str, task_seconds: float = 5.0, repeats: int = 3) -> list[dict]:
    """Rows ``{broker, tool, scenario, gap, total, task_done_on_old, ok}`` for one broker."""
    from realsupervisor import Supervisord, copy_project

    url = BROKERS[broker]
    uid = uuid.uuid4().hex[:8]
    rows = []
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as tmp:
        project = copy_project(Path(tmp) / "project")
        (Path(tmp) / "sup").mkdir()
        queue = f"restartbench-{uid}" if url else None
        run = Supervisord(Path(tmp) / "sup", concurrency=2, stopwaitsecs=max(10, task_seconds + 5),
                          project_dir=project, broker_url=url, queues=queue,
                          node_prefix=f"rbench{uid}-" if url else "demo")
        try:
            run.start()
            run.wait_nodes()
            [node] = run.node_names()
            # Each repeat restarts idle, then busy, with both tools; which tool
            # goes first alternates, so a drift in the machine's load shifts both.
            plan = [(tool, scenario) for i in range(repeats) for scenario in ("idle", "busy")
                    for tool in order(i, TOOLS)]
            for tool, scenario in plan:
                task = None
                old = run.worker_pids()[0]
                if scenario == "busy":
                    task = run.celery.mark(hold=task_seconds, queue=queue)
                    run.celery.wait_for_mark(task, "started")
                row = _supervisorctl(run, node) if tool == "supervisorctl" else _celery_supervise(run, project)
                done = _done(run, task) if task else None
                row.update(broker=broker, tool=tool, scenario=scenario,
                           task_done_on_old=None if task is None else bool(done and done["worker"] == old),
                           lost=int(task is not None and done is None), orphans=_orphans(run))
                rows.append(row)
                run.wait_nodes()
        finally:
            run.stop()
            if url:
                purge_redis(REDIS_URL, uid)
    return rows


def _done(run, task: str) -> dict | None:
    """The task's ``done`` stamp, waiting up to 30 s for it; ``None``: lost."""
    from realprocs import WaitTimeout

    try:
        return run.celery.wait_for_mark(task, "done", timeout=30)
    except WaitTimeout:
        return None


def _orphans(run) -> list[int]:
    """PIDs of live processes of this run outside supervisord's tree and ours."""
    import psutil
    from realprocs import RUN_ENV_VAR

    mark = os.environ[RUN_ENV_VAR]
    mine = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    try:
        theirs = {run.pid} | {c.pid for c in psutil.Process(run.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        theirs = set()
    found = []
    for p in psutil.process_iter():
        if p.pid in mine or p.pid in theirs:
            continue
        try:
            if p.environ().get(RUN_ENV_VAR) == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def run(brokers=("filesystem", "redis"), task_seconds: float = 5.0, repeats: int = 3) -> list[dict]:
    """Measure on each broker; every process started is gone when it returns."""
    from realprocs import RUN_ENV_VAR, reap_leaks

    mark = os.environ.setdefault(RUN_ENV_VAR, "restart-bench-" + uuid.uuid4().hex)
    os.environ.pop("CELERY_BROKER_URL", None)
    try:
        return [row for b in brokers for row in measure(b, task_seconds, repeats)]
    finally:
        leaked = reap_leaks(mark, exclude={os.getpid()})
        if leaked:
            print(f"restart_bench: {leaked}", file=sys.stderr)


def table(rows: list[dict]) -> str:
    def s(v):
        return "-" if v is None else f"{v:.2f} s"

    lines = ["| broker | command | worker | consume gap | new worker's start-up | whole restart "
             "| task finished on old worker | lost tasks | orphans | exit ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        task = "-" if r["task_done_on_old"] is None else ("yes" if r["task_done_on_old"] else "no")
        lines.append(f"| {r['broker']} | {r['tool']} restart | {r['scenario']} | {s(r['gap'])} "
                     f"| {s(r.get('startup'))} | {s(r['total'])} | {task} | {r['lost']} | {len(r['orphans'])} "
                     f"| {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/restart_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="filesystem,redis", help="comma list of filesystem, redis")
    parser.add_argument("--task-seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="restarts per command and worker state")
    args = parser.parse_args(argv)
    bytecode_cache_on()
    rows = run(tuple(b for b in args.brokers.split(",") if b), args.task_seconds, args.repeats)
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
