"""Drain overhead: how long after the last running task finishes does a drain return?

    python bench/drain_bench.py [--brokers filesystem,redis] [--repeats 5]

One supervisord (the tests' harness, ``tests/realsupervisor.py``) runs the
demo worker (``-c 1``) from a private copy of ``django_app/``. Each repeat
starts a ``mark`` task that holds for 2 s, waits until it has started, then
drains the worker and measures from the task's ``done`` stamp (written by
the task itself, wall clock) to the drain command's exit. Three sides, in
an order that rotates from one repeat to the next:

* **ours**: ``celery-supervise -A demo drain`` (it cancels the consumers,
  then polls ``reserved`` + ``active`` with the known number of replies,
  a round every ``drain.POLL_INTERVAL`` at most);
* **baseline**: what a user would otherwise type, ``celery -A demo control
  cancel_consumer QUEUE`` and then ``celery -A demo inspect active`` in a
  loop until it lists nothing (no sleep between calls);
* **floor**: the shortest Python that makes drain's decision with the same
  app and worker: ``python -c`` importing the app, one connection, the
  cancel, then ``reserved`` + ``active`` (``limit=1``) rounds at the same
  cadence as ours until both are empty. It prints how long each round took:
  the median is "one round trip".

Target: ours ≤ one poll interval + one round trip after the last task
(a round that starts just before the task ends sees it; the next one, one
interval later, decides). Ours and the floor also report their CPU time
(user + system, from ``wait4``). After each repeat the consumer is added
back (``add_consumer``) for the next. Measurements, not tests: nothing is
asserted. Everything started carries ``CELERY_SUPERVISE_TEST_RUN`` and is
stopped through supervisord's shutdown, then swept by that mark, by PID.
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

from bench.measure import Child, bytecode_cache_on, order, run_child  # noqa: E402
from celery_supervise.celery_side.drain import POLL_INTERVAL  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
BROKERS = {"filesystem": None, "redis": REDIS_URL}
HOLD = 2.0
TARGET = 0.5
CELERY = str(Path(sys.executable).with_name("celery"))
SIDES = ("ours", "baseline", "floor")
#: A sample whose wall clock moved against the monotonic clock by more than this is taken again.
CLOCK_SLACK = 0.05

# The floor of drain's decision, run from the project folder like `celery -A`:
# argv: node, queue, seconds between the starts of two rounds.
FLOOR = """
import json, os, sys, time
sys.path.insert(0, os.getcwd())
from demo.celery import app
node, queue, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
conn = app.connection_for_write()
conn.ensure_connection(max_retries=1)
app.control.cancel_consumer(queue, destination=[node], connection=conn)
rounds = []
while True:
    began = time.monotonic()
    ask = app.control.inspect(destination=[node], limit=1, timeout=1.0, connection=conn)
    reserved, active = ask.reserved() or {}, ask.active() or {}
    rounds.append(time.monotonic() - began)
    if reserved.get(node) == [] and active.get(node) == []:
        break
    time.sleep(max(0.0, interval - rounds[-1]))
decided = time.time()
conn.release()
print(json.dumps({"rounds": rounds, "decided": decided}))
"""


def _ours(run, project: Path) -> tuple[float, Child, float]:
    """(when it exited, the run, when it decided: the result's ``finished_at``)."""
    done = run_child([sys.executable, "-m", "celery_supervise", "-A", "demo", "drain", "--drain-timeout", "30", "--json"],
                     cwd=str(project), env=run.env, timeout=60)
    returned = time.time()
    if done.returncode != 0 or not json.loads(done.stdout)["drained"]:
        raise RuntimeError(f"celery-supervise drain exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return returned, done, json.loads(done.stdout)["finished_at"]


def _floor(run, project: Path, node: str, queue: str) -> tuple[float, Child, dict]:
    done = run_child([sys.executable, "-c", FLOOR, node, queue, str(POLL_INTERVAL)], cwd=str(project),
                     env=run.env, timeout=60)
    returned = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"the drain floor exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return returned, done, json.loads(done.stdout)


def _baseline(run, project: Path, node: str, queue: str) -> float:
    def celery(*args):
        return subprocess.run([CELERY, "-A", "demo", *args], cwd=project, env=run.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)

    cancelled = celery("control", "cancel_consumer", queue, "-d", node)
    if cancelled.returncode != 0:
        raise RuntimeError(f"celery control cancel_consumer exited {cancelled.returncode}: {cancelled.stderr[-300:]}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        active = celery("inspect", "active", "-d", node, "--json")
        # Exit 0 with a reply {"node": []}: the loop a user writes stops
        # when the reply names no task. No reply (exit 1) means keep going.
        if active.returncode == 0:
            try:
                replies = json.loads(active.stdout)
            except ValueError:
                continue
            if replies and not any(replies.values()):
                return time.time()
    raise RuntimeError("celery inspect active still listed the task after 30 s")


def _one(run, project: Path, side: str, node: str, queue: str, url: str | None) -> dict:
    """One drain by *side* of a running 2 s task; seconds from the task's end, by key of ``measure``'s result."""
    task = run.celery.mark(hold=HOLD, queue=queue if url else None)
    run.celery.wait_for_mark(task, "started")
    decided = cpu = None
    rounds: list[float] = []
    if side == "ours":
        returned, child, decided = _ours(run, project)
        cpu = child.cpu
    elif side == "floor":
        returned, child, said = _floor(run, project, node, queue)
        cpu, rounds, decided = child.cpu, said["rounds"], said["decided"]
    else:
        returned = _baseline(run, project, node, queue)
    done = run.celery.mark_record(task, "done")
    if done is None:
        raise RuntimeError(f"{side}: the drain returned before the task finished")
    sample = {side: returned - done["time"]}
    if side != "baseline":
        sample.update({f"{side}_cpu": cpu, f"{side}_decided": decided - done["time"]})
    if side == "floor":
        sample["rounds"] = rounds
    return sample


def measure(broker: str, repeats: int = 5) -> dict:
    """Seconds from the task's end to each command's exit, per side; CPU seconds; the floor's rounds.

    ``{"ours": [...], "baseline": [...], "floor": [...], "ours_cpu": [...], "floor_cpu": [...],
    "rounds": [...], "ours_decided": [...], "floor_decided": [...], "clock_steps": n}`` (``rounds``:
    every round of every floor run, in seconds; ``*_decided``: from the task's end to the decision,
    before the process exits; ``clock_steps``: samples taken again because the clock was set).
    """
    from realsupervisor import Supervisord, copy_project

    url = BROKERS[broker]
    uid = uuid.uuid4().hex[:8]
    out = {side: [] for side in (*SIDES, "ours_cpu", "floor_cpu", "rounds", "ours_decided", "floor_decided")}
    out["clock_steps"] = 0
    with tempfile.TemporaryDirectory(prefix="drain-bench-") as tmp:
        project = copy_project(Path(tmp) / "project")
        (Path(tmp) / "sup").mkdir()
        queue = f"drainbench-{uid}" if url else "celery"
        run = Supervisord(Path(tmp) / "sup", concurrency=1, stopsignal="QUIT", stopwaitsecs=5,
                          project_dir=project, broker_url=url, queues=queue if url else None,
                          node_prefix=f"dbench{uid}-" if url else "demo")
        try:
            run.start()
            run.wait_nodes()
            [node] = run.node_names()
            # Warm-up, unmeasured: .pyc files, page cache.
            run_child([sys.executable, "-m", "celery_supervise", "--help"], cwd=str(project), env=run.env)
            run_child([sys.executable, "-c", "import sys, os; sys.path.insert(0, os.getcwd()); import demo.celery"],
                      cwd=str(project), env=run.env)
            for i in range(repeats):
                for side in order(i, SIDES):
                    for _attempt in range(3):
                        # The task's done stamp and our exit are wall-clock times:
                        # a clock set meanwhile (another session's fault tests set
                        # it) makes the sample meaningless, so it is taken again.
                        offset = time.time() - time.monotonic()
                        sample = _one(run, project, side, node, queue, url)
                        stepped = abs(time.time() - time.monotonic() - offset) >= CLOCK_SLACK
                        replies = run.celery.app.control.add_consumer(queue, destination=[node], reply=True,
                                                                      timeout=10)
                        if not replies:
                            raise RuntimeError(f"{node} did not answer add_consumer")
                        if not stepped:
                            break
                        out["clock_steps"] += 1
                    else:
                        raise RuntimeError("the wall clock was set during three tries in a row")
                    for key, value in sample.items():
                        if isinstance(value, list):
                            out[key].extend(value)
                        elif value is not None:
                            out[key].append(value)
                    print(f"drain bench: {broker} {side} {i + 1}/{repeats}: {out[side][-1]:.2f} s",
                          file=sys.stderr, flush=True)
        finally:
            run.stop()
            if url:
                from brokers import clean_redis

                clean_redis(url, uid)
    return out


def run(brokers=("filesystem", "redis"), repeats: int = 5) -> dict:
    """``{broker: measure(broker)}``; every process started is gone when it returns."""
    from realprocs import RUN_ENV_VAR, reap_leaks

    mark = os.environ.setdefault(RUN_ENV_VAR, "drain-bench-" + uuid.uuid4().hex)
    os.environ.pop("CELERY_BROKER_URL", None)
    try:
        return {b: measure(b, repeats) for b in brokers}
    finally:
        leaked = reap_leaks(mark, exclude={os.getpid()})
        if leaked:
            print(f"drain_bench: {leaked}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/drain_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="filesystem,redis", help="comma list of filesystem, redis")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    bytecode_cache_on()
    for broker, sides in run(tuple(b for b in args.brokers.split(",") if b), args.repeats).items():
        for side, samples in sides.items():
            if isinstance(samples, list):
                print(f"{broker:10} {side:13} " + " ".join(f"{s:.3f}" for s in samples))
        print(f"{broker:10} samples taken again because the clock was set: {sides['clock_steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
