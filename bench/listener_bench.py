"""The eventlistener: how soon leftovers die after a stop, and how much memory it holds.

Two measurements, each a function returning plain data (seconds, bytes):

* :func:`latency` -- a real supervisord runs the demo worker with two
  ``spawn_family`` tasks (six children each, three of them attached) and,
  for "ours", the listener (``--grace 2``, priority below the worker's).
  ``supervisorctl stop`` SIGKILLs the worker after ``stopwaitsecs=2``. We
  time from the ``stopped: celery-worker_0`` line of supervisord's log
  (millisecond stamps) to the moment the last attached child is gone,
  polled every millisecond. The baseline is the deploy-script path, without
  the listener: ``celery-supervise -A demo savepid FILE --supervisor-url
  URL --program 'celery-worker:*'`` before the stop and
  ``celery-supervise -A demo kill FILE --grace 2`` the moment
  ``supervisorctl stop`` returns. Target: ours ≤ 200 ms + --grace. A
  negative figure means the children were gone before supervisord logged
  the stop: the listener reaps on the worker's exit (a pidfd), not on the
  STOPPED event, which supervisord dispatches up to a second later.
* :func:`rss` -- the listener command itself, started by a stand-in parent
  named ``supervisord`` (the listener refuses any other parent) with
  supervisord's environment variables, is fed 10,000 events through the
  real protocol: ticks, RUNNING of a process that looks like a Celery
  worker (its record rewritten each time, fsync included), STOPPED of that
  worker while it still runs, state changes of other programs, and
  SUPERVISOR_STATE_CHANGE_RUNNING (a sweep). Its RSS is sampled every
  1,000 events. Target: < 60 MB, and flat.

    .venv/bin/python bench/listener_bench.py [--repeats N] [--events N] [--only latency|rss]

Every process started here carries the tests' run mark
(``CELERY_SUPERVISE_TEST_RUN``, with a value of its own) in its
environment, has a bounded lifetime, and is killed by PID at the end; a
final sweep by that mark catches anything left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.measure import bytecode_cache_on, order  # noqa: E402
DJANGO_APP = REPO / "django_app"
BIN = Path(sys.executable).parent
CELERY_SUPERVISE = str(BIN / "celery-supervise")

GRACE = 2.0
LATENCY_TARGET = 0.200  # seconds, on top of --grace
RSS_TARGET = 60 * 2**20  # bytes
PROGRAM = "celery-worker"  # the harness's worker program
ATTACHED = ("plain", "plain_grandparent", "plain_grandchild")

def _harness():
    """The tests' real-process helpers (tests/ is not a package)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import realprocs
    import realsupervisor

    return realprocs, realsupervisor


def _mark() -> tuple[str, str]:
    """The run mark every process we start inherits: (variable, value)."""
    realprocs, _ = _harness()
    os.environ.setdefault(realprocs.RUN_ENV_VAR, f"listener-bench-{uuid.uuid4().hex}")
    # Celery reads CELERY_BROKER_URL first: keep the surroundings' broker out.
    os.environ.pop("CELERY_BROKER_URL", None)
    return realprocs.RUN_ENV_VAR, os.environ[realprocs.RUN_ENV_VAR]


def _sweep(run_id: str) -> None:
    realprocs, _ = _harness()
    leaked = realprocs.reap_leaks(run_id, exclude={os.getpid()})
    if leaked:
        print(f"listener bench: {leaked}", file=sys.stderr)


def summary(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "median": statistics.median(samples), "min": min(samples), "max": max(samples)}


# ------------------------------------------------------------------ latency


def _log_time(line: str) -> float:
    """Epoch seconds of a supervisord log line (``2026-11-21 16:32:26,806 ...``)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _stopped_at(run, process: str, after: float) -> float:
    """Time of the last ``stopped: PROCESS`` line of supervisord's log, at or after *after*."""
    found = None
    for line in run.log().splitlines():
        if f"stopped: {process} " in line:
            t = _log_time(line)
            if t >= after - 0.002:  # the log keeps milliseconds only
                found = t
    if found is None:
        raise RuntimeError(f"no 'stopped: {process}' line in supervisord.log after the stop")
    return found


def _cli(*args, run, wait=True):
    argv = [CELERY_SUPERVISE, "-A", "demo", *args]
    if not wait:
        return subprocess.Popen(argv, cwd=run.project_dir, env=run.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(argv, cwd=run.project_dir, env=run.env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr}")
    return done


def _one_stop(run, with_listener: bool, state: Path) -> float:
    """Start two families, stop the worker, return seconds from its log line to the last attached gone."""
    realprocs, _ = _harness()
    run.wait_ready()
    if with_listener:
        # Until the listener has recorded the worker it cannot reap it.
        [pid] = run.group_pids(PROGRAM).values()
        realprocs.wait_for(lambda: f'"pid": {pid}' in _read(run.dir / "listener.log"), 30, "the worker's record")
    task_ids = [run.celery.spawn_family(hold=60, lifetime=90) for _ in range(2)]
    markers = [run.celery.wait_for_marker(t) for t in task_ids]
    family = [psutil.Process(p) for m in markers for p in m["children"].values()]
    attached = [psutil.Process(m["children"][r]) for m in markers for r in ATTACHED]
    if not with_listener:
        # Only this supervisord's worker: a scan alone would also record any
        # other worker of the demo project running on this host.
        _cli("savepid", str(state), "--supervisor-url", f"unix://{run.socket}", "--program", f"{PROGRAM}:*",
             run=run)
    began = time.time()
    stop = subprocess.Popen([str(BIN / "supervisorctl"), "-c", str(run.conf_path), "stop", f"{PROGRAM}:*"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=run.env)
    killer = None
    gone_at = None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if killer is None and not with_listener and stop.poll() is not None:
                killer = _cli("kill", str(state), "--grace", str(GRACE), run=run, wait=False)
            if all(realprocs.is_gone(p) for p in attached):
                gone_at = time.time()
                break
            time.sleep(0.001)
        stop.wait(timeout=60)
        if killer is not None:
            killer.wait(timeout=60)
    finally:
        realprocs.reap(family)  # the detached ones, and anything a failure left
    if gone_at is None:
        raise RuntimeError("the attached children outlived the stop by a minute")
    latency = gone_at - _stopped_at(run, f"{PROGRAM}_0", began)
    result = run.ctl("start", f"{PROGRAM}:*")
    if result.returncode != 0:
        raise RuntimeError(f"cannot start the worker again: {result.stdout}{result.stderr}")
    return latency


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def latency(repeats: int = 5) -> dict:
    """Seconds from the worker's ``stopped`` log line to its last attached leftover gone.

    Both sides run at once, each under a supervisord of its own (ours with
    the listener, the baseline without), and their stops alternate: which
    side goes first changes from one repeat to the next.

    Returns ``{"grace", "target", "ours": [...], "baseline": [...], "clock_steps"}``
    (``clock_steps``: stops measured again because the wall clock was set).
    """
    _, realsupervisor = _harness()
    _, run_id = _mark()
    workdir = Path(tempfile.mkdtemp(prefix="listener-bench-"))
    out = {"grace": GRACE, "target": GRACE + LATENCY_TARGET, "ours": [], "baseline": [], "clock_steps": 0}
    runs = {}
    try:
        # A copy of the demo project: no scan by anybody else's tool run
        # finds our workers as "workers of this project", nor we theirs.
        project = realsupervisor.copy_project(workdir / "project")
        for side, with_listener in (("ours", True), ("baseline", False)):
            extra = realsupervisor.listener_section(CELERY_SUPERVISE, GRACE, project, autorestart="unexpected")
            directory = workdir / side
            directory.mkdir()
            runs[side] = realsupervisor.Supervisord(
                directory, stopwaitsecs=2, priority=200, extra=extra if with_listener else "",
                project_dir=project, env={"CELERY_SUPERVISE_LOCK": str(workdir / "reaper.lock")})
            runs[side].start()
        for i in range(repeats):
            for side in order(i):
                for _attempt in range(3):
                    # supervisord's log stamps and ours are wall-clock times: a
                    # clock set meanwhile (another session's fault tests set it)
                    # makes the sample meaningless, so it is taken again.
                    offset = time.time() - time.monotonic()
                    seconds = _one_stop(runs[side], side == "ours", workdir / side / "state.json")
                    if abs(time.time() - time.monotonic() - offset) < 0.05:
                        break
                    out["clock_steps"] += 1
                else:
                    raise RuntimeError("the wall clock was set during three tries in a row")
                out[side].append(seconds)
                print(f"listener bench: latency, {side} {i + 1}/{repeats}: {seconds * 1000:.0f} ms",
                      file=sys.stderr)
    finally:
        for run in runs.values():
            run.stop()
        _sweep(run_id)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------- rss

# The stand-in parent: a file named supervisord, so that the listener's
# parent check (the basename of argv[0] or argv[1]) passes.
_PARENT = """\
import sys
sys.path.insert(0, {repo!r})
from bench.listener_bench import feed
feed(sys.argv[1])
"""

# Looks like `celery -A demo worker` to the listener: a file named celery.
_FAKE_WORKER = """\
import time
time.sleep(float({lifetime!r}))
"""


def _frame(serial: int, eventname: str, payload: str) -> bytes:
    body = payload.encode()
    header = (f"ver:3.0 server:supervisor serial:{serial} pool:celery-supervise poolserial:{serial} "
              f"eventname:{eventname} len:{len(body)}\n")
    return header.encode() + body


def _events(worker_pid: int):
    """An endless, repeating mix of events, ten at a time."""
    worker = f"processname:{PROGRAM}_0 groupname:{PROGRAM}"
    other = "processname:web groupname:web"
    mix = [
        ("TICK_60", lambda: f"when:{int(time.time())}"),
        ("PROCESS_STATE_RUNNING", lambda: f"{worker} from_state:STARTING pid:{worker_pid}"),
        ("PROCESS_STATE_STARTING", lambda: f"{other} from_state:STOPPED tries:0"),
        ("PROCESS_STATE_RUNNING", lambda: f"{worker} from_state:STARTING pid:{worker_pid}"),
        ("SUPERVISOR_STATE_CHANGE_RUNNING", lambda: ""),
        ("PROCESS_STATE_RUNNING", lambda: f"{other} from_state:STARTING pid:999999"),
        ("PROCESS_STATE_STOPPED", lambda: f"{worker} from_state:STOPPING pid:{worker_pid}"),
        ("PROCESS_STATE_RUNNING", lambda: f"{worker} from_state:STARTING pid:{worker_pid}"),
        ("PROCESS_STATE_EXITED", lambda: f"{other} from_state:RUNNING expected:0 pid:999999"),
        ("PROCESS_STATE_BACKOFF", lambda: f"{other} from_state:STARTING"),
    ]
    while True:
        for name, payload in mix:
            yield name, payload()


def _expect(stream, token: bytes) -> None:
    got = b""
    while len(got) < len(token):
        chunk = stream.read(len(token) - len(got))
        if not chunk:
            raise RuntimeError(f"the listener closed its stdout; expected {token!r}, got {got!r}")
        got += chunk
    if got != token:
        raise RuntimeError(f"protocol: expected {token!r}, got {got!r}")


def feed(config: str) -> None:
    """Run as the stand-in supervisord: start the listener, feed it, print the samples as JSON."""
    cfg = json.loads(config)
    tmp = Path(cfg["dir"])
    # Run from a folder with a demo/ of its own: to any scan for workers of
    # the real demo project (another session's savepid) it is another project.
    worker = subprocess.Popen([sys.executable, str(tmp / "celery"), "-A", "demo", "worker"],
                              cwd=tmp, stdin=subprocess.DEVNULL, start_new_session=True)
    env = dict(os.environ, SUPERVISOR_SERVER_URL=f"unix://{tmp}/nobody.sock", SUPERVISOR_ENABLED="1",
               SUPERVISOR_PROCESS_NAME="celery-supervise", SUPERVISOR_GROUP_NAME="celery-supervise",
               CELERY_SUPERVISE_BROKER_DIR=str(tmp / "broker"), CELERY_SUPERVISE_LOCK=str(tmp / "reaper.lock"))
    with open(tmp / "listener.log", "wb") as log:
        listener = subprocess.Popen(
            [CELERY_SUPERVISE, "-A", "demo", "listener", "--state-dir", str(tmp / "state"), "--grace", "1"],
            cwd=DJANGO_APP, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    samples = []
    try:
        proc = psutil.Process(listener.pid)
        _expect(listener.stdout, b"READY\n")
        began = time.monotonic()
        samples.append({"events": 0, "rss": proc.memory_info().rss, "seconds": 0.0})
        for serial, (name, payload) in enumerate(_events(worker.pid), start=1):
            listener.stdin.write(_frame(serial, name, payload))
            listener.stdin.flush()
            _expect(listener.stdout, b"RESULT 2\nOK")
            _expect(listener.stdout, b"READY\n")
            if serial % cfg["every"] == 0:
                samples.append({"events": serial, "rss": proc.memory_info().rss,
                                "seconds": time.monotonic() - began})
            if serial >= cfg["events"]:
                break
        listener.stdin.close()  # end of input: the listener leaves, touching nothing
        code = listener.wait(timeout=30)
        alive = worker.poll() is None
    finally:
        for p in (listener, worker):
            if p.poll() is None:
                p.kill()
                p.wait()
    print(json.dumps({"samples": samples, "exit_code": code, "fake_worker_left_alone": alive}))


def rss(events: int = 10_000, every: int = 1_000) -> dict:
    """The listener's RSS (bytes) after every *every* events, up to *events*.

    Returns ``{"target", "samples": [{"events", "rss", "seconds"}], "exit_code", ...}``.
    """
    var, run_id = _mark()
    tmp = Path(tempfile.mkdtemp(prefix="listener-rss-"))
    try:
        (tmp / "state").mkdir(mode=0o700)
        (tmp / "demo").mkdir()
        (tmp / "supervisord").write_text(_PARENT.format(repo=str(REPO)))
        (tmp / "celery").write_text(_FAKE_WORKER.format(lifetime=600))
        done = subprocess.run([sys.executable, str(tmp / "supervisord"),
                               json.dumps({"dir": str(tmp), "events": events, "every": every})],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"the feeder failed ({done.returncode}): {done.stderr[-3000:]}\n"
                               f"listener log: {_read(tmp / 'listener.log')[-3000:]}")
        out = json.loads(done.stdout)
        actions: dict[str, int] = {}
        for line in _read(tmp / "listener.log").splitlines():
            try:
                action = json.loads(line)["action"]
            except (ValueError, KeyError, TypeError):
                action = "(not JSON)"
            actions[action] = actions.get(action, 0) + 1
        out.update(target=RSS_TARGET, actions=actions)
        return out
    finally:
        _sweep(run_id)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------- main


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/listener_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="stops per side for the latency (default 5)")
    parser.add_argument("--events", type=int, default=10_000, help="events fed for the RSS (default 10,000)")
    parser.add_argument("--only", choices=("latency", "rss"), action="append")
    args = parser.parse_args(argv)
    bytecode_cache_on()
    only = set(args.only or ("latency", "rss"))
    if "latency" in only:
        lat = latency(args.repeats)
        ours, base = summary(lat["ours"]), summary(lat["baseline"])
        verdict = "ok" if ours["median"] <= lat["target"] else "MISS"
        print(f"latency, 'stopped' log line -> last attached leftover gone (--grace {lat['grace']:g}):")
        print(f"  listener       median {_ms(ours['median'])}  (min {_ms(ours['min'])}, max {_ms(ours['max'])}, "
              f"n={ours['n']})  target ≤ {_ms(lat['target'])}: {verdict}")
        print(f"  savepid + kill median {_ms(base['median'])}  (min {_ms(base['min'])}, max {_ms(base['max'])}, "
              f"n={base['n']})")
    if "rss" in only:
        res = rss(args.events)
        mb = [s["rss"] / 2**20 for s in res["samples"]]
        last = res["samples"][-1]
        verdict = "ok" if max(mb) < res["target"] / 2**20 else "MISS"
        print(f"RSS of the listener over {last['events']:,} events ({last['events'] / last['seconds']:.0f} events/s):")
        print("  " + "  ".join(f"{s['events']:,}: {s['rss'] / 2**20:.1f} MB" for s in res["samples"]))
        print(f"  max {max(mb):.1f} MB, growth from 1,000 to {last['events']:,} events "
              f"{mb[-1] - mb[min(1, len(mb) - 1)]:+.1f} MB; target < {res['target'] / 2**20:.0f} MB: {verdict}")
        print(f"  exit at end of input: {res['exit_code']}; fake worker left alone: {res['fake_worker_left_alone']}")
        print(f"  listener log lines by action: {res['actions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
