"""Event storm: ``supervisorctl restart all`` of N workers; last stop → last leftover gone, the listener's RSS.

    python bench/storm_bench.py [--workers 32] [--repeats 3] [--buffer-size N]

One supervisord (``tests/storm.py``) runs N solo-pool demo workers and the
listener on Redis (db 5 unless ``BENCH_STORM_REDIS_URL`` says otherwise).
Each repeat has every worker run a ``spawn_family`` task that leaves six
children, waits until the listener has recorded every family, then runs
``supervisorctl restart all`` and measures:

* **latency**: from the last "stopped: celery-worker_N" line supervisord
  logs (its own millisecond stamp, wall clock) to the moment the last
  attached leftover is seen gone (polled every 5 ms); negative when the
  listener was done before supervisord logged the last stop;
* **RSS**: the listener's peak resident memory over the storm (sampled
  every 5 ms, both the listener that is stopped and the one started);
* **events**: how many events supervisord handed the listener during the
  restart (its debug log: "event N sent to listener"), and how many it
  discarded ("event buffer overflowed, discarding event"): the figure the
  recommended ``buffer_size`` rests on.

There is no baseline: nothing else reaps these trees. Measurements, not
tests: nothing is asserted. Everything started carries
``CELERY_SUPERVISE_TEST_RUN`` and is stopped through supervisord's
shutdown, then swept by that mark, by PID.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the harness lives with the tests

import psutil  # noqa: E402

from bench.measure import bytecode_cache_on  # noqa: E402

REDIS_URL = os.environ.get("BENCH_STORM_REDIS_URL", "redis://127.0.0.1:6379/5")
WORKERS = 32
#: Copy supervisord's log of the last storm here (for a post-mortem), when set.
KEEP_LOG = os.environ.get("BENCH_STORM_KEEP_LOG")


class PeakRSS(threading.Thread):
    """Samples the RSS of whichever process *current()* returns, every 5 ms, until stopped."""

    def __init__(self, current):
        super().__init__(daemon=True)
        self.current = current
        self.peak = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                self.peak = max(self.peak, self.current().memory_info().rss)
            except (psutil.Error, KeyError, OSError):
                pass  # between the old listener and the new one
            time.sleep(0.005)


def one(workers: int, buffer_size: int) -> dict:
    """One storm: ``{"latency", "rss", "events", "discarded", "restart", "left", "detached_killed", "start"}``."""
    from brokers import clean_redis
    from realprocs import is_gone
    from realsupervisor import copy_project
    from storm import Storm, watch_gone
    from taskfamily import ATTACHED, DETACHED
    from test_e2e_listener import Listening

    uid = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="storm-bench-") as tmp:
        project = copy_project(Path(tmp) / "project")
        (Path(tmp) / "sup").mkdir()
        storm = Storm(Path(tmp) / "sup", project, workers=workers, buffer_size=buffer_size, redis_url=REDIS_URL,
                      uid=uid, env={"CELERY_SUPERVISE_LOCK": str(Path(tmp) / "reaper.lock")})
        try:
            began = time.monotonic()
            storm.start()
            start = time.monotonic() - began
            families = storm.families(lambda *pids: [psutil.Process(p) for p in pids])
            entries = Listening(storm.run, None).entries
            storm.wait_recorded(families, entries)
            old_pids = [p.pid for p in storm.mains().values()]
            sent_before = len(storm.events_sent())
            attached = [f[r] for f in families for r in ATTACHED]
            rss = PeakRSS(storm.listener)
            rss.start()
            t0 = time.time()
            offset = t0 - time.monotonic()  # a clock set meanwhile makes the wall-clock latency meaningless
            watcher_result: dict = {}
            watcher = threading.Thread(target=lambda: watcher_result.update(
                watch_gone(attached, time.monotonic() + 240)), daemon=True)
            watcher.start()
            restarted = storm.run.ctl("restart", "all", timeout=400)
            restart = time.time() - t0
            watcher.join()
            rss.halt.set()
            rss.join()
            if restarted.returncode != 0:
                raise RuntimeError(f"supervisorctl restart all exited {restarted.returncode}: {restarted.stdout[-300:]}")
            storm.wait_settled(entries, old_pids)  # every event of the restart handed over (or dropped)
            left = len(attached) - len(watcher_result)
            last_gone = max(watcher_result.values()) if watcher_result else float("nan")
            return {
                "latency": last_gone - storm.last_stop(t0),
                "rss": rss.peak,
                "events": len(storm.events_sent(sent_before)),
                "discarded": len(storm.discarded()),
                "restart": restart,
                "left": left,
                "detached_killed": sum(is_gone(f[r]) for f in families for r in DETACHED),
                "start": start,
                "clock_stepped": abs(time.time() - time.monotonic() - offset) >= 0.05,
            }
        finally:
            storm.run.stop()
            clean_redis(REDIS_URL, uid)
            if KEEP_LOG:
                Path(KEEP_LOG).write_text(storm.run.log())
                Path(KEEP_LOG + ".listener").write_text(storm.run.log("listener"))


def run(workers: int = WORKERS, repeats: int = 3, buffer_size: int | None = None) -> list[dict]:
    """*repeats* storms, each with a supervisord of its own; every process started is gone when it returns."""
    from celery_supervise.commands.print_config import buffer_size_for
    from realprocs import RUN_ENV_VAR, reap_leaks

    mark = os.environ.setdefault(RUN_ENV_VAR, "storm-bench-" + uuid.uuid4().hex)
    os.environ.pop("CELERY_BROKER_URL", None)
    size = buffer_size or buffer_size_for(workers)
    try:
        out = []
        for i in range(repeats):
            out.append({**one(workers, size), "buffer_size": size})
            print(f"storm bench: {workers} workers, {i + 1}/{repeats}: {out[-1]}", file=sys.stderr, flush=True)
        return out
    finally:
        leaked = reap_leaks(mark, exclude={os.getpid()})
        if leaked:
            print(f"storm_bench: {leaked}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/storm_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--buffer-size", type=int, default=None, help="default: what print-config recommends")
    args = parser.parse_args(argv)
    bytecode_cache_on()
    for r in run(args.workers, args.repeats, args.buffer_size):
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
