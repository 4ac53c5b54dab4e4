"""The supervisord eventlistener: snapshot on every start and stop, reap after.

Runs as ``[eventlistener:celery-supervise]`` subscribed to
``PROCESS_STATE,SUPERVISOR_STATE_CHANGE,TICK_60``. stdout carries only the
listener protocol (through :mod:`supervisor.childutils`); every action is one
JSON line on stderr.

What it does on each event:

* ``PROCESS_STATE_RUNNING`` (and every tick): record the worker's identity,
  its supervisord's identity and its current tree in ``STATE_DIR``.
* ``PROCESS_STATE_STOPPING``: snapshot the tree again, with the active tasks
  when ``-A`` is given and the worker answers within a short bound.
* ``PROCESS_STATE_STOPPED``/``EXITED``/``BACKOFF``/``FATAL``: kill the
  leftovers by the core's verdicts and write a report.
* its own start, ``SUPERVISOR_STATE_CHANGE_RUNNING`` and ticks: sweep
  ``STATE_DIR`` for workers that are gone (reap what they left) or orphaned
  (alive, but their supervisord is dead: warm TERM, ``--grace``, then kill).
* its own SIGTERM: reap every recorded worker that is already dead, then exit.
  During ``supervisorctl shutdown`` it never sees the worker's STOPPED event
  (supervisord stops it in the same instant), so this is where that reap
  happens; give the listener a *lower* priority than the workers.
* end of input (supervisord was SIGKILLed): exit at once, touch nothing; the
  next supervisord's listener sweeps.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import psutil
from supervisor import childutils

from . import control, discovery, kill as killing, operations, procs, report, snapshot, statefile
from .errors import EXIT_USAGE, SuperviseError
from .plan import Policy, plan
from .snapshot import Task

STOP_EVENTS = {"PROCESS_STATE_STOPPED", "PROCESS_STATE_EXITED", "PROCESS_STATE_BACKOFF", "PROCESS_STATE_FATAL"}
STOPPING_TASKS_TIMEOUT = 0.5  # a STOPPING event must not hold the listener up for long
RECORD_SUFFIX = ".json"
REPORT_SUFFIX = ".report.json"


class Stop(Exception):
    """Raised from the SIGTERM handler to leave the blocking read."""


@dataclass(frozen=True)
class Identity:
    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> "Identity | None":
        ct = procs.live_identity(pid)
        return None if ct is None else cls(pid, ct)

    def alive(self) -> bool:
        ct = procs.live_identity(self.pid)
        return ct is not None and abs(ct - self.create_time) <= procs.CREATE_TIME_TOLERANCE


def parse_payload(payload: str) -> dict:
    """``key:value`` tokens of a PROCESS_STATE/TICK payload (body ignored)."""
    line = payload.split("\n", 1)[0]
    try:
        return childutils.get_headers(line)
    except ValueError:
        raise ValueError(f"malformed payload {line[:200]!r}") from None


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Listener:
    """Handles supervisord events; streams, clock and RPC are passed in for tests."""

    def __init__(
        self,
        *,
        state_dir: str,
        programs: list[str] = (),
        grace: float = operations.DEFAULT_GRACE,
        policy: Policy = Policy(),
        app=None,
        app_spec: str | None = None,
        supervisor: Identity | None = None,
        rpc=None,
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
        stderr: TextIO = sys.stderr,
        clock: Callable[[], float] = time.time,
    ):
        self.state_dir = state_dir
        self.programs = list(programs)
        self.grace = grace
        self.policy = policy
        self.app = app
        self.app_spec = app_spec
        self.supervisor = supervisor
        self.rpc = rpc
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.clock = clock

    # ------------------------------------------------------------ plumbing

    def log(self, action: str, **fields) -> None:
        line = {"ts": round(self.clock(), 3), "action": action, **fields}
        self.stderr.write(json.dumps(line, sort_keys=True, default=str) + "\n")
        self.stderr.flush()

    def record_path(self, program: str, pid: int) -> str:
        return os.path.join(self.state_dir, f"{safe_name(program)}@{pid}{RECORD_SUFFIX}")

    def records(self, program: str | None = None) -> list[str]:
        prefix = f"{safe_name(program)}@" if program else ""
        try:
            names = os.listdir(self.state_dir)
        except OSError as exc:
            self.log("error", error=f"cannot list {self.state_dir}: {exc}")
            return []
        return sorted(
            os.path.join(self.state_dir, n)
            for n in names
            if n.endswith(RECORD_SUFFIX) and not n.endswith(REPORT_SUFFIX) and n.startswith(prefix)
            and not n.startswith(".")
        )

    def watched(self, program: str, pid: int | None) -> int | None:
        """The worker main PID if *program* is one we watch, else ``None``."""
        if self.programs:
            short = program.split(":", 1)[-1]
            if not any(fnmatch.fnmatchcase(program, p) or fnmatch.fnmatchcase(short, p) for p in self.programs):
                return None
        if not pid:
            return None
        return discovery.worker_main_under(pid, self.app_spec)

    # -------------------------------------------------------------- events

    def handle_event(self, headers: dict, payload: str) -> None:
        """Handle one event. Never raises for a bad event: logs it instead."""
        event = headers.get("eventname", "")
        try:
            if event.startswith("TICK_"):
                self.refresh()
                self.sweep("tick")
            elif event == "SUPERVISOR_STATE_CHANGE_RUNNING":
                self.sweep("supervisord started")
            elif event.startswith("PROCESS_STATE_"):
                self.on_process_state(event, parse_payload(payload))
            elif event:
                self.log("ignored", event=event)
            else:
                self.log("malformed", error="no eventname", headers=headers)
        except (ValueError, KeyError, TypeError) as exc:
            self.log("malformed", event=event, error=str(exc))
        except (SuperviseError, OSError, psutil.Error) as exc:
            self.log("error", event=event, error=f"{type(exc).__name__}: {exc}")

    def on_process_state(self, event: str, fields: dict) -> None:
        program = f"{fields['groupname']}:{fields['processname']}"
        if fields["groupname"] == fields["processname"]:
            program = fields["processname"]
        pid = int(fields["pid"]) if fields.get("pid", "0").isdigit() else 0
        if event == "PROCESS_STATE_RUNNING":
            main = self.watched(program, pid)
            if main is not None:
                for old in self.records(program):
                    if not old.endswith(f"@{main}{RECORD_SUFFIX}"):
                        self.reap(old, "replaced by a new start")
                self.record(program, main, "running")
        elif event == "PROCESS_STATE_STOPPING":
            main = self.watched(program, pid)
            if main is not None:
                self.record(program, main, "stopping", tasks=True)
        elif event in STOP_EVENTS:
            paths = self.records(program)
            if pid:
                paths = [p for p in paths if p.endswith(f"@{pid}{RECORD_SUFFIX}")] or [
                    p for p in paths if self._main_dead(p)
                ]
            else:
                paths = [p for p in paths if self._main_dead(p)]
            for path in paths:
                self.reap(path, event)

    # ------------------------------------------------------------- records

    def record(self, program: str, main_pid: int, why: str, tasks: bool = False) -> None:
        found_tasks: tuple[Task, ...] = ()
        worker = snapshot.read_worker(main_pid, program=program,
                                      supervisor_pid=self.supervisor.pid if self.supervisor else None)
        if worker is None:
            return
        command = discovery.parse_worker_cmdline(worker.main.cmdline)
        node = command.node if command else None
        if tasks and self.app is not None and command is not None:
            found_tasks = self._active_tasks(main_pid, command)
        worker = snapshot.Worker(main=worker.main, procs=worker.procs, node=node, app=command.app if command else None,
                                 program=program, supervisor_pid=worker.supervisor_pid, tasks=found_tasks)
        snap = snapshot.take([worker], "listener")
        doc = statefile.to_document(snap, self.policy, plan([worker], self.policy))
        if self.supervisor:
            doc["supervisor"] = {"pid": self.supervisor.pid, "create_time": self.supervisor.create_time}
        path = self.record_path(program, main_pid)
        statefile.write(path, doc)
        self.log("recorded", program=program, pid=main_pid, why=why, processes=len(worker.procs),
                 tasks=len(found_tasks))

    def _active_tasks(self, main_pid: int, command) -> tuple[Task, ...]:
        try:
            conn = control.connect(self.app, timeout=STOPPING_TASKS_TIMEOUT)
            try:
                replies = control.inspect(self.app, conn, "active", nodes=[command.node], expected=1,
                                          timeout=STOPPING_TASKS_TIMEOUT)
            finally:
                conn.release()
        except SuperviseError as exc:
            self.log("warning", pid=main_pid, warning=f"no active tasks recorded: {exc}")
            return ()
        return tuple(Task.from_reply(t) for t in replies.get(command.node) or () if isinstance(t, dict))

    def refresh(self) -> None:
        """Re-read the trees of the live workers our supervisord runs."""
        for path in self.records():
            rec = self._load(path)
            if rec is None or not rec.snapshot.workers or self._supervisor_of(path) != self.supervisor:
                continue
            worker = rec.snapshot.workers[0]
            if Identity(worker.main.pid, worker.main.create_time).alive():
                self.record(worker.program or "?", worker.main.pid, "tick")

    def _load(self, path: str):
        try:
            rec = statefile.read(path, host=snapshot.hostname(), boot_time=procs.boot_time())
        except SuperviseError as exc:
            self.log("refused", record=path, error=str(exc))
            self._set_aside(path)
            return None
        if isinstance(rec, statefile.LegacyRecord):
            self.log("refused", record=path, error="not a listener record")
            self._set_aside(path)
            return None
        return rec

    def _set_aside(self, path: str) -> None:
        # Never acted on, and moved out of the way so it is not re-read on
        # every tick; kept for a human to look at.
        try:
            os.rename(path, path + ".invalid")
        except OSError:
            pass

    def _supervisor_of(self, path: str) -> Identity | None:
        try:
            with open(path) as f:
                sup = json.load(f).get("supervisor") or {}
            return Identity(int(sup["pid"]), float(sup["create_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _main_dead(self, path: str) -> bool:
        rec = self._load(path)
        if rec is None:
            return False
        main = rec.snapshot.workers[0].main if rec.snapshot.workers else None
        return main is None or not Identity(main.pid, main.create_time).alive()

    # ---------------------------------------------------------------- reap

    def reap(self, path: str, why: str) -> None:
        """Kill what a stopped worker left, write the report, drop the record."""
        rec = self._load(path)
        if rec is None:
            return
        try:
            result = operations.kill(path, grace=self.grace)
        except SuperviseError as exc:
            self.log("error", record=path, error=str(exc))
            return
        doc = report.kill_document(result)
        doc["why"] = why
        doc["tasks"] = [t.__dict__ for w in rec.snapshot.workers for t in w.tasks]
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        report_path = path[: -len(RECORD_SUFFIX)] + f".{stamp}{REPORT_SUFFIX}"
        statefile.write(report_path, doc)
        os.unlink(path)
        self.log("reaped", record=os.path.basename(path), why=why, report=report_path,
                 killed=[o.proc.pid for o in result.by_status(killing.KILLED)],
                 spared={o.proc.pid: o.reason for o in result.by_status(killing.SPARED)},
                 failed=[o.proc.pid for o in result.by_status(killing.FAILED)],
                 tasks=[t["id"] for t in doc["tasks"]])

    def sweep(self, why: str) -> None:
        """Reap workers that are gone; warm-stop and reap those whose supervisord died."""
        for path in self.records():
            rec = self._load(path)
            if rec is None or not rec.snapshot.workers:
                continue
            main = rec.snapshot.workers[0].main
            if not Identity(main.pid, main.create_time).alive():
                self.reap(path, f"{why}: worker gone")
                continue
            sup = self._supervisor_of(path)
            if sup is not None and not sup.alive():
                self.warm_stop(main)
                self.reap(path, f"{why}: orphaned (its supervisord {sup.pid} is gone)")

    def warm_stop(self, main: procs.Proc) -> None:
        """SIGTERM the main alone (Celery's warm shutdown), wait --grace for it."""
        result = killing.signal_proc(main, signal.SIGTERM)
        self.log("warm-stop", pid=main.pid, result=result, grace=self.grace)
        deadline = time.monotonic() + self.grace
        while killing.alive(main) and time.monotonic() < deadline:
            time.sleep(killing.POLL_INTERVAL)

    def finish(self) -> None:
        """On our own SIGTERM: reap every recorded worker that is already dead."""
        for path in self.records():
            if self._main_dead(path):
                self.reap(path, "listener stopping")

    # ---------------------------------------------------------------- loop

    def start(self) -> None:
        """At our own start: sweep, then record workers that are already running.

        A listener only receives events once it is RUNNING itself, and
        PROCESS_STATE_STARTING carries no pid, so workers started alongside
        us are found by asking supervisord.
        """
        self.sweep("listener started")
        if self.rpc is None:
            return
        try:
            infos = self.rpc.supervisor.getAllProcessInfo()
        except Exception as exc:  # any transport failure: the events will catch up
            self.log("warning", warning=f"cannot list supervisord's processes: {exc}")
            return
        for info in infos:
            if info.get("statename") == "RUNNING" and info.get("pid"):
                self.on_process_state("PROCESS_STATE_RUNNING", {
                    "groupname": info["group"], "processname": info["name"], "pid": str(info["pid"])})

    def read_event(self) -> tuple[dict, str] | None:
        """childutils' wait(), except that end of input returns ``None``."""
        childutils.listener.ready(self.stdout)
        line = self.stdin.readline()
        if not line:
            return None
        headers = childutils.get_headers(line)
        payload = self.stdin.read(int(headers.get("len", 0)))
        return headers, payload

    def run(self) -> int:
        def on_term(signum, frame):
            raise Stop()

        signal.signal(signal.SIGTERM, on_term)
        try:
            self.start()
            while True:
                try:
                    event = self.read_event()
                except ValueError as exc:
                    # A broken header line: we cannot know its length, so we
                    # cannot resynchronise; acknowledging keeps supervisord going.
                    self.log("malformed", error=str(exc))
                    childutils.listener.ok(self.stdout)
                    continue
                if event is None:
                    self.log("exit", why="end of input (supervisord gone); workers left for the next sweep")
                    return 0
                self.handle_event(*event)
                childutils.listener.ok(self.stdout)
        except Stop:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.log("stopping", why="SIGTERM")
            self.finish()
            return 0


def from_environment(environ: dict) -> tuple[Identity, object]:
    """Our supervisord's identity and RPC proxy, or a usage error outside one."""
    if "SUPERVISOR_SERVER_URL" not in environ or "SUPERVISOR_PROCESS_NAME" not in environ:
        raise SuperviseError("the listener must run under supervisord as an [eventlistener:x] section")
    ppid = os.getppid()
    ident = Identity.of(ppid)
    try:
        cmd = psutil.Process(ppid).cmdline()
    except psutil.Error:
        cmd = []
    if ident is None or not any(os.path.basename(a) == "supervisord" for a in cmd[:2]):
        raise SuperviseError("the listener's parent is not supervisord; run it as an [eventlistener:x] section")
    return ident, childutils.getRPCInterface(environ)


__all__ = ["Listener", "Identity", "parse_payload", "from_environment", "EXIT_USAGE"]
