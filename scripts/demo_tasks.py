"""The task side of scripts/demo.sh: start spawn_family tasks, then show what became of them.

    python scripts/demo_tasks.py wait-ready [--timeout S]
    python scripts/demo_tasks.py start DIR [--count N] [--hold S] [--lifetime S]
    python scripts/demo_tasks.py report DIR
    python scripts/demo_tasks.py cleanup DIR
    python scripts/demo_tasks.py listener-log LOG --since EPOCH

``start`` sends ``demo.tasks.spawn_family`` tasks through the demo
project's own Celery app (same broker as its worker), waits for their
markers, and records every child's PID and creation time in
``DIR/families.json``. ``report`` tells, child by child, whether it is
alive or dead, and exits 1 unless exactly the attached ones are dead.
``cleanup`` kills the children still alive, by PID, after checking the
creation time, so a recycled PID is never signalled. ``listener-log``
sums up what celery-supervise's eventlistener reaped since EPOCH.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import psutil

DJANGO_APP = Path(__file__).resolve().parent.parent / "django_app"
FAMILIES = "families.json"
MARKER_TIMEOUT = 30.0
KILL_TIMEOUT = 5.0

# Kind of child -> what celery-supervise should do with it, and why.
EXPECTED = {
    "plain": ("dead", "attached: dies with the worker"),
    "plain_grandparent": ("dead", "attached: dies with the worker"),
    "plain_grandchild": ("dead", "attached: dies with the worker"),
    "nohup": ("alive", "spared: nohup (ignores SIGHUP)"),
    "setsid": ("alive", "spared: own session (setsid)"),
    "setsid_grandchild": ("alive", "spared: child of the setsid one"),
}


def say(text: str) -> None:
    print(text, flush=True)


def celery_app():
    """The demo project's Celery app, configured from its Django settings."""
    sys.path.insert(0, str(DJANGO_APP))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")
    from demo.celery import app

    return app


def wait_ready(args) -> int:
    app = celery_app()
    start = time.monotonic()
    while True:
        replies = app.control.ping(timeout=0.5)
        if replies:
            names = ", ".join(name for reply in replies for name in reply)
            say(f"worker {names} answered a ping after {time.monotonic() - start:.1f}s")
            return 0
        if time.monotonic() - start > args.timeout:
            say(f"no worker answered a ping within {args.timeout:g}s; see var/celery-worker.log")
            return 1


def start(args) -> int:
    app = celery_app()
    markers = args.dir / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    task_ids = [
        app.send_task("demo.tasks.spawn_family",
                      kwargs={"marker_dir": str(markers), "hold": args.hold, "lifetime": args.lifetime}).id
        for _ in range(args.count)
    ]
    families = []
    deadline = time.monotonic() + MARKER_TIMEOUT
    for task_id in task_ids:
        path = markers / f"{task_id}.json"
        while not path.exists():
            if time.monotonic() > deadline:
                say(f"task {task_id} wrote no marker within {MARKER_TIMEOUT:g}s; see var/celery-worker.log")
                return 1
            time.sleep(0.05)
        marker = json.loads(path.read_text())
        children = {}
        for kind, pid in marker["children"].items():
            proc = psutil.Process(pid)
            children[kind] = {"pid": pid, "create_time": proc.create_time(), "command": shlex.join(proc.cmdline())}
        families.append({"task_id": task_id, "pool_pid": marker["pool_pid"], "children": children})
    (args.dir / FAMILIES).write_text(json.dumps(families, indent=1))
    for family in families:
        say(f"task {family['task_id']} runs in pool process {family['pool_pid']} and started:")
        for kind, child in family["children"].items():
            say(f"  {kind:<18} PID {child['pid']:<7} {_short(child['command'])}")
    return 0


def _short(command: str, width: int = 40) -> str:
    return command if len(command) <= width else command[: width - 1] + "…"


def _current(child: dict) -> psutil.Process | None:
    """The live process *child* recorded, or None (gone, a zombie, or a recycled PID)."""
    try:
        proc = psutil.Process(child["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - child["create_time"]) > 0.005:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list, timeout: float) -> list:
    """Poll until *procs* have exited (a zombie has) or *timeout* passes; return the rest.

    Not psutil.wait_procs: these are not our children, and for those it
    waits until init has collected the zombie.
    """
    deadline = time.monotonic() + timeout
    while (left := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def _families(directory: Path) -> list:
    try:
        return json.loads((directory / FAMILIES).read_text())
    except FileNotFoundError:
        return []


def report(args) -> int:
    wrong = []
    counts = {"dead": 0, "alive": 0}
    for family in _families(args.dir):
        say(f"task {family['task_id']} (ran in pool process {family['pool_pid']}):")
        for kind, child in family["children"].items():
            now = "alive" if _current(child) else "dead"
            want, why = EXPECTED[kind]
            counts[now] += 1
            mark = "ok" if now == want else f"WRONG, should be {want}"
            say(f"  {now:<5}  {kind:<18} PID {child['pid']:<7} {why} [{mark}]")
            if now != want:
                wrong.append(f"{kind} {child['pid']}")
    if wrong:
        say(f"UNEXPECTED: {', '.join(wrong)}")
        return 1
    say(f"as expected: {counts['dead']} attached children killed, {counts['alive']} detached ones spared")
    return 0


def cleanup(args) -> int:
    # Children before parents: the setsid grandchild before its shell.
    alive = [(kind, proc) for family in _families(args.dir)
             for kind, child in reversed(list(family["children"].items()))
             if (proc := _current(child)) is not None]
    if not alive:
        say("no demo process is left to kill")
        return 0
    say("killing the demo processes still alive, by PID: " + ", ".join(f"{kind} {p.pid}" for kind, p in alive))
    left = [p for _, p in alive]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in left:
            try:
                proc.send_signal(sig)  # psutil checks the creation time first
            except psutil.NoSuchProcess:
                pass
        left = _wait_gone(left, KILL_TIMEOUT)
        if not left:
            return 0
    say("could not kill: " + ", ".join(str(p.pid) for p in left))
    return 1


def listener_log(args) -> int:
    """One line per reap in the eventlistener's log (JSON lines on its stderr)."""
    try:
        lines = args.log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("action") != "reaped" or entry.get("ts", 0) < args.since:
            continue
        say(f"the eventlistener reaped {entry.get('record', 'a worker')}: "
            f"killed {_pid_list(entry.get('killed'))}; spared {_pid_list(entry.get('spared'))}")
    return 0


def _pid_list(value) -> str:
    if isinstance(value, (list, dict)):
        return " ".join(str(pid) for pid in value) or "none"
    return str(value)


def main(argv=None) -> int:
    # kombu warns "No hostname was supplied" for every filesystem:// connection.
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(prog="demo_tasks.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wait-ready", help="wait until a worker answers a ping")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(run=wait_ready)
    p = sub.add_parser("start", help="start spawn_family tasks and wait for their markers")
    p.add_argument("dir", type=Path)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--hold", type=float, default=8.0, help="seconds each task runs after spawning")
    p.add_argument("--lifetime", type=int, default=120, help="seconds each child lives at most")
    p.set_defaults(run=start)
    for name, run, text in (("report", report, "show which children are alive or dead"),
                            ("cleanup", cleanup, "kill the children still alive, by PID")):
        p = sub.add_parser(name, help=text)
        p.add_argument("dir", type=Path)
        p.set_defaults(run=run)
    p = sub.add_parser("listener-log", help="what the eventlistener reaped")
    p.add_argument("log", type=Path)
    p.add_argument("--since", type=float, default=0.0, help="only entries from this Unix time on")
    p.set_defaults(run=listener_log)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
