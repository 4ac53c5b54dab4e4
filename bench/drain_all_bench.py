"""``drain --all`` overhead with 1, 5 and 20 workers, and the broker round trips its decision costs.

    python bench/drain_all_bench.py [--workers 1,5,20] [--repeats 5]

For each worker count N, one supervisord (the tests' harness,
``tests/realsupervisor.py``) runs N demo workers (``numprocs=N``, ``-c 1``,
prefetch multiplier 1) from a private copy of ``django_app/``, all
consuming one queue of their own on Redis (db 4 unless
``BENCH_DRAIN_ALL_REDIS_URL`` says otherwise). Each repeat sends N ``mark``
tasks that hold 2 s, waits until every one has started (one per worker, or
a worker's second once its first is done: nothing is left in the queue to
strand), then drains every worker and measures from the last task's
``done`` stamp (wall clock, written by the task) to the command's exit.
Two sides, alternating run by run:

* **ours**: ``celery-supervise -A demo drain --all`` (cancels, one
  ``active_queues`` broadcast to learn the nodes, then ``reserved`` +
  ``active`` rounds addressed to the N nodes, each returning once N
  replies are in);
* **baseline**: what a user would write without it, ``celery -A demo
  control cancel_consumer QUEUE`` (to every worker) then ``celery -A demo
  inspect active --json`` in a loop until every reply is empty and N
  replies came (each call waits its full 1 s timeout: it does not know N).

Round trips: after the timed runs, one more drain runs in this process
through :class:`celery_supervise.celery_side.drain.Drainer` with a
:class:`CountingRemote` wrapped around the real :class:`control.Remote`,
on the same workers and the same kind of load. It counts every broadcast
the drain published (cancels, inspect questions) and every reply it got,
with their times, so the table can say how many broadcasts the decision
cost after the last task finished, and that this does not grow with N.

Measurements, not tests: nothing is asserted. Everything started carries
``CELERY_SUPERVISE_TEST_RUN`` and is stopped through supervisord's
shutdown, then swept by that mark, by PID.
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

from bench.measure import bytecode_cache_on, order, run_child  # noqa: E402

REDIS_URL = os.environ.get("BENCH_DRAIN_ALL_REDIS_URL", "redis://127.0.0.1:6379/4")
WORKERS = (1, 5, 20)
HOLD = 2.0
#: ours ≤ this long after the last task, with 20 workers (issue 13).
TARGET = 1.0
CELERY = str(Path(sys.executable).with_name("celery"))
SIDES = ("ours", "baseline")
CLOCK_SLACK = 0.05
#: How long N workers may take to answer a first ping on a loaded 2-core machine.
START_TIMEOUT = 240.0


class CountingRemote:
    """A :class:`celery_supervise.celery_side.control.Remote` that notes every broadcast and reply count, with times."""

    def __init__(self, remote):
        self.remote = remote
        self.calls: list[dict] = []  # {"what", "at" (wall clock when sent), "replies"}

    def cancel_consumer(self, queue, nodes, valid_for):
        self.calls.append({"what": f"cancel_consumer {queue}", "at": time.time(), "replies": 0})
        self.remote.cancel_consumer(queue, nodes, valid_for)

    def inspect(self, command, nodes, timeout):
        call = {"what": command, "at": time.time(), "replies": 0}
        self.calls.append(call)
        replies = self.remote.inspect(command, nodes, timeout)
        call["replies"] = len(replies)
        return replies


def _send(run, n: int, queue: str) -> list[str]:
    tasks = [run.celery.mark(hold=HOLD, queue=queue) for _ in range(n)]
    deadline = time.monotonic() + 4 * HOLD + 30
    while not all(run.celery.mark_record(t, "started") for t in tasks):
        if time.monotonic() > deadline:
            raise RuntimeError("the mark tasks did not all start")
        time.sleep(0.02)
    return tasks


def _last_done(run, tasks: list[str]) -> float:
    records = [run.celery.mark_record(t, "done") for t in tasks]
    if not all(records):
        raise RuntimeError("the drain returned before every task finished")
    return max(r["time"] for r in records)


def _ours(run, project: Path) -> float:
    done = run_child([sys.executable, "-m", "celery_supervise", "-A", "demo", "drain", "--all", "--drain-timeout", "30",
                      "--json"], cwd=str(project), env=run.env, timeout=60)
    returned = time.time()
    if done.returncode != 0 or not json.loads(done.stdout)["drained"]:
        raise RuntimeError(f"celery-supervise drain --all exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return returned


def _baseline(run, project: Path, queue: str, n: int) -> float:
    def celery(*args):
        return subprocess.run([CELERY, "-A", "demo", *args], cwd=project, env=run.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)

    cancelled = celery("control", "cancel_consumer", queue)
    if cancelled.returncode != 0:
        raise RuntimeError(f"celery control cancel_consumer exited {cancelled.returncode}: {cancelled.stderr[-300:]}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        active = celery("inspect", "active", "--json")
        if active.returncode == 0:
            try:
                replies = json.loads(active.stdout)
            except ValueError:
                continue
            if len(replies) >= n and not any(replies.values()):
                return time.time()
    raise RuntimeError("celery inspect active still listed a task after 30 s")


def _add_back(run, queue: str, nodes: list[str]) -> None:
    replies = run.celery.app.control.add_consumer(queue, destination=nodes, reply=True, limit=len(nodes), timeout=10)
    if len(replies or ()) < len(nodes):
        raise RuntimeError(f"only {len(replies or ())} of {len(nodes)} workers answered add_consumer")


def _counted(run, project: Path, queue: str, n: int) -> dict:
    """One drain in this process, through a CountingRemote; what it sent and when, against the last task's end."""
    from celery_supervise.celery_side import control, drain
    from celery_supervise.celery_side.drain import Drainer

    sys.path.insert(0, str(project))
    os.environ.update({k: v for k, v in run.env.items() if k.startswith(("CELERY", "DJANGO"))})
    old_cwd = os.getcwd()
    os.chdir(project)
    try:
        app = control.load_app("demo")
        tasks = _send(run, n, queue)
        with control.Remote(app) as real:
            counting = CountingRemote(real)
            result = Drainer(counting).run(None, drain.configured_queues(app.conf.task_default_queue,
                                                                         app.conf.task_queues), 30)
        last = _last_done(run, tasks)
    finally:
        os.chdir(old_cwd)
    after = [c for c in counting.calls if c["at"] >= last]
    return {
        "drained": result.drained,
        "broadcasts": len(counting.calls),
        "rounds": sum(c["what"] == drain.RESERVED for c in counting.calls),
        "cancels": sum(c["what"].startswith("cancel_consumer") for c in counting.calls),
        "broadcasts_after_last_task": len(after),
        "replies": sum(c["replies"] for c in counting.calls),
        "decided_after_last_task": result.finished_at - last,
        "timeline": [(c["what"], round(c["at"] - last, 3), c["replies"]) for c in counting.calls],
    }


def measure(n: int, repeats: int = 5) -> dict:
    """``{"ours": [...], "baseline": [...], "count": {...}, "clock_steps": k, "start": seconds}`` for N=*n* workers."""
    from brokers import clean_redis
    from realsupervisor import Supervisord, copy_project

    uid = uuid.uuid4().hex[:8]
    queue = f"dallbench-{uid}"
    out: dict = {"ours": [], "baseline": [], "clock_steps": 0}
    with tempfile.TemporaryDirectory(prefix="drain-all-bench-") as tmp:
        project = copy_project(Path(tmp) / "project")
        (Path(tmp) / "sup").mkdir()
        run = Supervisord(Path(tmp) / "sup", concurrency=1, numprocs=n, stopsignal="QUIT", stopwaitsecs=5,
                          project_dir=project, broker_url=REDIS_URL, queues=queue, node_prefix=f"dall{uid}-")
        try:
            began = time.monotonic()
            run.start()
            run.wait_nodes(START_TIMEOUT)
            out["start"] = time.monotonic() - began
            nodes = run.node_names()
            run_child([sys.executable, "-m", "celery_supervise", "--help"], cwd=str(project), env=run.env)
            for i in range(repeats):
                for side in order(i, SIDES):
                    for _attempt in range(3):
                        offset = time.time() - time.monotonic()
                        tasks = _send(run, n, queue)
                        returned = _ours(run, project) if side == "ours" else _baseline(run, project, queue, n)
                        sample = returned - _last_done(run, tasks)
                        _add_back(run, queue, nodes)
                        if abs(time.time() - time.monotonic() - offset) < CLOCK_SLACK:
                            break
                        out["clock_steps"] += 1
                    else:
                        raise RuntimeError("the wall clock was set during three tries in a row")
                    out[side].append(sample)
                    print(f"drain --all bench: {n} workers, {side} {i + 1}/{repeats}: {sample:.2f} s",
                          file=sys.stderr, flush=True)
            out["count"] = _counted(run, project, queue, n)
            _add_back(run, queue, nodes)
        finally:
            run.stop()
            clean_redis(REDIS_URL, uid)
    return out


def run(workers=WORKERS, repeats: int = 5) -> dict:
    """``{n: measure(n)}``; every process started is gone when it returns."""
    from realprocs import RUN_ENV_VAR, reap_leaks

    mark = os.environ.setdefault(RUN_ENV_VAR, "drain-all-bench-" + uuid.uuid4().hex)
    os.environ.pop("CELERY_BROKER_URL", None)
    try:
        return {n: measure(n, repeats) for n in workers}
    finally:
        leaked = reap_leaks(mark, exclude={os.getpid()})
        if leaked:
            print(f"drain_all_bench: {leaked}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/drain_all_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,5,20", help="comma list of worker counts")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    bytecode_cache_on()
    for n, res in run(tuple(int(w) for w in args.workers.split(",")), args.repeats).items():
        print(f"{n:3} workers: ours {' '.join(f'{s:.3f}' for s in res['ours'])}; "
              f"baseline {' '.join(f'{s:.3f}' for s in res['baseline'])}; start {res['start']:.1f} s")
        print(f"    counted drain: {json.dumps(res['count'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
