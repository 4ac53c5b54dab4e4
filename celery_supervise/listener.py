"""The supervisord eventlistener: snapshot on every start and stop, reap after.

Runs as ``[eventlistener:celery-supervise]`` subscribed to
``PROCESS_STATE,SUPERVISOR_STATE_CHANGE,TICK_60``. stdout carries only the
listener protocol (through :mod:`supervisor.childutils`); every action is one
JSON line on stderr.

What it does on each event:

* ``PROCESS_STATE_STARTING``: place the new process in a cgroup of its own
  (see :mod:`celery_supervise.cgroups`), long before its first task forks.
* ``PROCESS_STATE_RUNNING`` (and every tick): place it, marked late, if
  that did not happen; record the worker's identity,
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

Between events the listener holds a pidfd of every worker it recorded.
supervisord dispatches a STOPPED/EXITED event one turn of its poll loop
after it reaps the worker, up to a second later, so the pidfd is what starts
the reap within milliseconds of the worker's exit; the event then finds
nothing left to do. While waiting it also re-reads those workers' trees
every ``REFRESH_INTERVAL`` seconds and rewrites a record when a process
appeared, so a worker that crashes (no STOPPING event) is reaped by a
recent tree. A record never drops a process that still lives.

Only a blocking wait is interrupted by SIGTERM; an event or reap under way
is finished first.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO

import psutil
from supervisor import childutils

from . import cgroups, control, discovery, kill as killing, operations, procs, report, snapshot, statefile
from .errors import EXIT_USAGE, SuperviseError, UsageError
from .plan import Policy, plan
from .snapshot import Task

STOP_EVENTS = {"PROCESS_STATE_STOPPED", "PROCESS_STATE_EXITED", "PROCESS_STATE_BACKOFF", "PROCESS_STATE_FATAL"}
STOPPING_TASKS_TIMEOUT = 0.5  # a STOPPING event must not hold the listener up for long
# Between events, re-read the recorded trees this often and rewrite a record
# whose tree grew: a worker that crashes (no STOPPING event) is then reaped
# by a tree at most this old, not one from its start or the last tick.
REFRESH_INTERVAL = 2.0
#: Larger than any event we subscribe to (supervisord's own payloads are a
#: line or two); a header announcing more is malformed.
MAX_PAYLOAD = 1 << 24
RECORD_SUFFIX = ".json"
REPORT_SUFFIX = ".report.json"


class Stop(BaseException):
    """Raised from the SIGTERM handler to leave a blocking wait.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way (Celery's, kombu's, our own edges') can swallow it.
    """


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

    def same(self, other: "Identity | None") -> bool:
        """The same process; a record's creation time is rebased, so not always bit for bit equal."""
        return other is not None and other.pid == self.pid \
            and abs(other.create_time - self.create_time) <= procs.CREATE_TIME_TOLERANCE


def parse_payload(payload: str) -> dict:
    """``key:value`` tokens of a PROCESS_STATE/TICK payload (body ignored)."""
    line = payload.split("\n", 1)[0]
    try:
        return childutils.get_headers(line)
    except ValueError:
        raise ValueError(f"malformed payload {line[:200]!r}") from None


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _identities(worker: snapshot.Worker) -> set[tuple[int, float]]:
    return {(p.pid, p.create_time) for p in worker.procs}


def _merged(now: snapshot.Worker, before: snapshot.Worker) -> snapshot.Worker:
    """*now*, plus the processes of *before* that still live but are no longer in the tree."""
    seen = {p.pid for p in now.procs}
    kept = [p for p in before.procs[1:] if p.pid not in seen and killing.alive(p)]
    if not kept:
        return now
    # Creation order puts every parent ahead of its children, as a record must.
    rest = sorted([*now.procs[1:], *kept], key=lambda p: p.create_time)
    return snapshot.Worker(main=now.main, procs=(now.main, *rest), node=now.node, app=now.app,
                           program=now.program, supervisor_pid=now.supervisor_pid, tasks=now.tasks)


def _text(data: bytes | str) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


class Listener:
    """Handles supervisord events; streams, clock and RPC are passed in for tests."""

    def __init__(
        self,
        *,
        state_dir: str,
        programs: Iterable[str] = (),
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
        refresh_interval: float = REFRESH_INTERVAL,
        cgroup_mode: str = cgroups.AUTO,
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
        # Read bytes when we can: the header's len counts bytes, not characters.
        self._input = getattr(stdin, "buffer", stdin)
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.cgroup_mode = cgroup_mode
        self._containment: dict[str, str] = {}  # program -> the mechanism last logged for it
        self.stop_requested = False
        self._waiting = False  # blocked on input: SIGTERM may interrupt
        self._watches: dict[str, int] = {}  # record path -> pidfd of its worker main
        self._last: dict[str, snapshot.Worker] = {}  # record path -> what it holds now

    # ------------------------------------------------------------ plumbing

    def log(self, action: str, **fields) -> None:
        line = {"ts": round(self.clock(), 3), "action": action, **fields}
        try:
            self.stderr.write(json.dumps(line, sort_keys=True, default=str) + "\n")
            self.stderr.flush()
        except OSError:
            # Our stderr is a pipe to supervisord: once it is gone (SIGKILLed)
            # nobody can read the line, and the action must not fail for it.
            pass

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

    def ours(self, program: str) -> bool:
        """Whether *program* is one of those we watch (all, without --program)."""
        short = program.split(":", 1)[-1]
        return not self.programs or any(fnmatch.fnmatchcase(program, p) or fnmatch.fnmatchcase(short, p)
                                        for p in self.programs)

    def watched(self, program: str, pid: int | None) -> int | None:
        """The worker main PID if *program* is one we watch, else ``None``."""
        if not self.ours(program):
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
                self.tick()
            elif event == "SUPERVISOR_STATE_CHANGE_RUNNING":
                self.sweep("supervisord started")
            elif event.startswith("PROCESS_STATE_"):
                self.on_process_state(event, parse_payload(payload))
            elif event:
                self.log("ignored", event=event)
            else:
                self.log("malformed", error="no eventname", headers=headers)
        except (ValueError, KeyError, TypeError) as exc:
            self.log("malformed", event=event, error=f"{type(exc).__name__}: {exc}")
        except (SuperviseError, OSError, psutil.Error) as exc:
            self.log("error", event=event, error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # the edge: a bug must cost one event, never the listener
            self.log("error", event=event, error=f"unexpected {type(exc).__name__}: {exc}")

    def safely(self, what: str, call: Callable, *args) -> None:
        """Run work done outside an event (start, a worker's exit, a refresh); log what fails."""
        try:
            call(*args)
        except (SuperviseError, OSError, psutil.Error) as exc:
            self.log("error", during=what, error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # the edge, as in handle_event
            self.log("error", during=what, error=f"unexpected {type(exc).__name__}: {exc}")

    def on_process_state(self, event: str, fields: dict, why: str | None = None) -> None:
        program = f"{fields['groupname']}:{fields['processname']}"
        if fields["groupname"] == fields["processname"]:
            program = fields["processname"]
        # STARTING, BACKOFF and FATAL carry no pid at all.
        raw_pid = fields.get("pid", "")
        pid = int(raw_pid) if raw_pid.isdigit() else 0
        if event == "PROCESS_STATE_STARTING":
            # STARTING carries no pid, but supervisord emits it from spawn()
            # and forks before we read it: ask for the pid it now has.
            if self.ours(program) and self.cgroup_mode != cgroups.OFF and self.rpc is not None:
                try:
                    pid = int(self.rpc.supervisor.getProcessInfo(program).get("pid") or 0)
                except Exception as exc:  # any transport failure or Fault (shutting down): RUNNING places it late
                    self.log("warning", program=program, warning=f"cannot ask supervisord for its PID: {exc}")
                    pid = 0
                if pid and self._worker_program(pid):
                    self.contain(program, pid, late=False)
        elif event == "PROCESS_STATE_RUNNING":
            main = self.watched(program, pid)
            if main is not None:
                self.contain(program, pid, late=True, main=main)
                stale = [p for p in self.records(program) if not p.endswith(f"@{main}{RECORD_SUFFIX}")]
                self.settle(stale, "replaced by a new start", replaced=True)
                self.record(program, main, why or event)
        elif event == "PROCESS_STATE_STOPPING":
            main = self.watched(program, pid)
            if main is not None:
                self.record(program, main, why or event, tasks=True)
        elif event in STOP_EVENTS:
            # Whatever pid the event names (a wrapper's, or none), every
            # record of this program whose worker is dead has leftovers to reap.
            for path in self.records(program):
                if self._main_dead(path):
                    self.reap(path, event)

    # ------------------------------------------------------------ cgroups

    def _worker_program(self, pid: int) -> bool:
        """Whether the process just started for a program is a worker's (at STARTING).

        With ``--program`` the user named the workers' programs. Without, only
        a process that already runs ``celery … worker`` is one: never another
        program of the same supervisord (nor this listener itself). One that
        has not exec'd yet is placed, late, at RUNNING.
        """
        if pid == os.getpid():
            return False
        if self.programs:
            return True
        found = procs.read_proc(pid)
        return found is not None and discovery.parse_worker_cmdline(found.cmdline) is not None

    def contain(self, program: str, pid: int, *, late: bool, main: int | None = None) -> None:
        """Place the process supervisord started for *program* in a cgroup of its own.

        Its current descendants (the worker's pool, when we place it at
        RUNNING, or at STARTING delivered late) are moved too: what they fork
        from now on is covered. Having any makes the placement late: what
        they forked before and already left the tree is not covered.
        """
        if self.cgroup_mode == cgroups.OFF or pid == os.getpid():
            return
        if cgroups.of_worker(main or pid, self.cgroup_mode)[0] is not None:
            return  # placed already (at STARTING, or by `celery-supervise contain`)
        parent = self.supervisor.pid if self.supervisor else os.getppid()
        root = procs.read_proc(pid)
        # Only the process supervisord started for the program, its direct
        # child: a PID from an event is never trusted to name anything else
        # (a bad or stale one could name PID 1, and move the whole machine).
        if root is None or root.ppid != parent:
            return
        also = [p.pid for p in procs.walk(root)]
        late = late or bool(also)
        try:
            cg = cgroups.place(pid, program, parent_pid=parent, late=late, also=also, mode=self.cgroup_mode)
        except cgroups.CgroupUnavailable as exc:
            self._log_containment(program, pid, cgroups.describe(None, str(exc)))
            return
        self._log_containment(program, pid, cgroups.describe(cg, None))

    def _log_containment(self, program: str, pid: int, mechanism: str) -> None:
        # Once per program and mechanism: a host without cgroups would
        # otherwise repeat the same line at every start and tick.
        if self._containment.get(program) != mechanism:
            self._containment[program] = mechanism
            self.log("containment", program=program, pid=pid, mechanism=mechanism)

    # ------------------------------------------------------------- records

    def record(self, program: str, main_pid: int, why: str, tasks: bool = False, if_changed: bool = False) -> None:
        """Write the record of one worker: its tree now, our supervisord, and tasks.

        With *tasks*, ask the worker for its active tasks; otherwise keep
        those an earlier record of this very worker holds (the STOPPING
        snapshot's). A process an earlier record holds and that still lives
        is kept even if it left the tree (re-parented when its pool process
        died): the record never forgets one, as the kill never would. With
        *if_changed*, write only if a process appeared since the last record
        (one that merely died is reported as gone from the record as it is).
        """
        worker = snapshot.read_worker(main_pid, program=program,
                                      supervisor_pid=self.supervisor.pid if self.supervisor else None)
        if worker is None:
            return
        # Its cgroup, and the members that already left the tree and the group.
        worker = operations.with_cgroup_members(worker, self.cgroup_mode)
        cgroup, cgroup_reason = worker.cgroup, worker.cgroup_reason
        path = self.record_path(program, main_pid)
        last = self._last.get(path)
        if last is not None and not last.main.same_process(worker.main):
            last = None  # the PID now names another worker
        if last is not None:
            worker = _merged(worker, last)
        if if_changed and last is not None and _identities(worker) <= _identities(last) and last.cgroup == cgroup:
            return
        command = discovery.parse_worker_cmdline(worker.main.cmdline)
        node = command.node if command else None
        found_tasks = last.tasks if last is not None else ()
        if tasks and self.app is not None and command is not None:
            found_tasks = self._active_tasks(main_pid, command) or found_tasks
        worker = snapshot.Worker(main=worker.main, procs=worker.procs, node=node, app=command.app if command else None,
                                 program=program, supervisor_pid=worker.supervisor_pid, tasks=found_tasks)
        worker = dataclasses.replace(worker, cgroup=cgroup, cgroup_reason=cgroup_reason)
        snap = snapshot.take([worker], "listener")
        doc = statefile.to_document(snap, self.policy, plan([worker], self.policy))
        if self.supervisor:
            doc["supervisor"] = {"pid": self.supervisor.pid, "create_time": self.supervisor.create_time}
        statefile.write(path, doc)
        self._last[path] = worker
        self._watch(path, worker.main)
        self.log("recorded", program=program, pid=main_pid, why=why, processes=len(worker.procs),
                 tasks=len(found_tasks))

    def refresh_changed(self) -> None:
        """Rewrite the record of every worker we watch that has a new process."""
        for w in list(self._last.values()):
            self.safely("refresh", lambda: self.record(w.program or "?", w.main.pid, "tree grew", if_changed=True))

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

    def tick(self) -> None:
        """Sweep, then re-record every running worker (catching any missed RUNNING)."""
        self.sweep("tick")
        if not self.record_running("tick"):
            self.refresh()

    def record_running(self, why: str) -> bool:
        """Record every watched worker supervisord says is RUNNING; False if it did not answer."""
        if self.rpc is None:
            return False
        try:
            infos = self.rpc.supervisor.getAllProcessInfo()
        except Exception as exc:  # any transport failure: the events will catch up
            self.log("warning", warning=f"{why}: cannot list supervisord's processes: {exc}")
            return False
        for info in infos:
            if info.get("statename") == "RUNNING" and info.get("pid"):
                self.on_process_state("PROCESS_STATE_RUNNING", {
                    "groupname": info["group"], "processname": info["name"], "pid": str(info["pid"])}, why)
        return True

    def refresh(self) -> None:
        """Re-read the trees of the live workers our supervisord runs."""
        for path in self.records():
            rec = self._load(path)
            if rec is None or not rec.snapshot.workers or not self._ours(self._supervisor_of(rec)):
                continue
            worker = rec.snapshot.workers[0]
            if Identity(worker.main.pid, worker.main.create_time).alive():
                self.record(worker.program or "?", worker.main.pid, "tick")

    def _load(self, path: str):
        try:
            rec = statefile.read_here(path)
        except SuperviseError as exc:
            if not os.path.lexists(path):
                return None  # reaped meanwhile (by another listener or a deploy script)
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
        self._unwatch(path)
        try:
            os.rename(path, path + ".invalid")
        except OSError:
            pass

    def _ours(self, sup: Identity | None) -> bool:
        """Whether a record's supervisord is ours (both unknown counts, as in tests without one)."""
        return sup.same(self.supervisor) if sup is not None else self.supervisor is None

    @staticmethod
    def _supervisor_of(rec: statefile.Record) -> Identity | None:
        # From the parsed record, not the raw file: its creation time is
        # rebased like the workers', so a listener started after the clock
        # was set does not take a live supervisord for a dead one (and
        # warm-stop its workers as orphans).
        return Identity(*rec.supervisor) if rec.supervisor else None

    def _main_dead(self, path: str) -> bool:
        rec = self._load(path)
        if rec is None:
            return False
        main = rec.snapshot.workers[0].main if rec.snapshot.workers else None
        return main is None or not Identity(main.pid, main.create_time).alive()

    # ------------------------------------------------------------- pidfds

    def _watch(self, path: str, main: procs.Proc) -> None:
        """Hold a pidfd of *main*, so that its exit wakes the wait for input."""
        if path in self._watches:
            return
        try:
            fd = os.pidfd_open(main.pid)
        except OSError:
            return  # gone already, or no pidfd here: the events and sweeps still reap
        # Opened after the snapshot: make sure the number still names that process.
        if not killing.alive(main):
            os.close(fd)
            return
        self._watches[path] = fd

    def _unwatch(self, path: str) -> None:
        self._last.pop(path, None)
        fd = self._watches.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for path in list(self._watches):
            self._unwatch(path)
        self._last.clear()

    # ---------------------------------------------------------------- reap

    def reap(self, path: str, why: str) -> None:
        """Kill what a stopped worker left, write the report, drop the record."""
        self._unwatch(path)
        rec = self._load(path)
        if rec is None:
            return
        try:
            result = operations.kill(path, grace=self.grace, cgroup_mode=self.cgroup_mode)
        except SuperviseError as exc:
            if not os.path.lexists(path):
                return  # another reaper got there first, under the lock
            self.log("error", record=path, error=str(exc))
            return
        doc = report.kill_document(result)
        doc["why"] = why
        doc["tasks"] = [t.__dict__ for w in rec.snapshot.workers for t in w.tasks]
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        report_path = path[: -len(RECORD_SUFFIX)] + f".{stamp}{REPORT_SUFFIX}"
        statefile.write(report_path, doc)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another reaper finished the same record
        self.log("reaped", record=os.path.basename(path), why=why, report=report_path,
                 killed=[o.proc.pid for o in result.by_status(killing.KILLED)],
                 spared={o.proc.pid: o.reason for o in result.by_status(killing.SPARED)},
                 failed=[o.proc.pid for o in result.by_status(killing.FAILED)],
                 tasks=[t["id"] for t in doc["tasks"]])

    def sweep(self, why: str) -> None:
        """Reap workers that are gone; warm-stop and reap those whose supervisord died."""
        self.settle(self.records(), why)

    def settle(self, paths: Iterable[str], why: str, replaced: bool = False) -> None:
        """Reap the recorded workers that are gone, warm-stop and reap the orphans.

        An orphan is alive but its supervisord is dead. With *replaced* (the
        same program of our supervisord has started a new worker), a live old
        worker of ours is a leftover too: typically a worker a wrapper script
        started, which outlived the wrapper supervisord stopped. A live
        worker of another live supervisord is never touched.
        """
        orphans = []
        for path in paths:
            rec = self._load(path)
            if rec is None or not rec.snapshot.workers:
                continue
            main = rec.snapshot.workers[0].main
            if not Identity(main.pid, main.create_time).alive():
                self.reap(path, f"{why}: worker gone")
                continue
            sup = self._supervisor_of(rec)
            if sup is not None and not sup.alive():
                orphans.append((path, main, f"{why}: orphaned (its supervisord {sup.pid} is gone)"))
            elif replaced and self._ours(sup):
                orphans.append((path, main, f"{why}: still running"))
        if orphans:
            self.warm_stop([main for _, main, _ in orphans])
            for path, _, reason in orphans:
                self.reap(path, reason)

    def warm_stop(self, mains: list[procs.Proc]) -> None:
        """SIGTERM the mains alone (Celery's warm shutdown), wait up to --grace for them."""
        for main in mains:
            result = killing.signal_proc(main, signal.SIGTERM)
            self.log("warm-stop", pid=main.pid, result=result, grace=self.grace)
        deadline = time.monotonic() + self.grace
        while any(killing.alive(m) for m in mains) and time.monotonic() < deadline:
            time.sleep(killing.POLL_INTERVAL)

    def _reap_if_dead(self, path: str, why: str) -> None:
        if os.path.exists(path) and self._main_dead(path):
            self.reap(path, why)

    def finish(self) -> None:
        """On our own SIGTERM: reap every recorded worker that is already dead."""
        for path in self.records():
            self.safely("finish", self._reap_if_dead, path, "listener stopping")

    # ---------------------------------------------------------------- loop

    def start(self) -> None:
        """At our own start: sweep, then record workers that are already running.

        A listener only receives events once it is RUNNING itself, and
        PROCESS_STATE_STARTING carries no pid, so workers started alongside
        us are found by asking supervisord.
        """
        self.safely("start", self.sweep, "listener started")
        self.safely("start", self.record_running, "listener started")

    def _blocking(self, call, *args):
        """Run a blocking read or wait that our SIGTERM may interrupt."""
        if self.stop_requested:
            raise Stop()
        self._waiting = True
        try:
            return call(*args)
        finally:
            self._waiting = False

    def wait_for_input(self) -> None:
        """Block until stdin is readable, reaping watched workers that exit meanwhile.

        Every *refresh_interval* seconds of waiting, the watched trees are
        re-read too.
        """
        try:
            fd = self._input.fileno()
        except (AttributeError, OSError, ValueError):  # a StringIO in tests: just read
            return
        next_refresh = time.monotonic() + self.refresh_interval
        while True:
            by_fd = {wfd: path for path, wfd in self._watches.items()}
            timeout = max(0.0, next_refresh - time.monotonic()) if self._last else None
            readable, _, _ = self._blocking(select.select, [fd, *by_fd], [], [], timeout)
            if fd in readable:
                return  # the event first: it may be end of input, and then we touch nothing
            if not readable:
                self.refresh_changed()
                next_refresh = time.monotonic() + self.refresh_interval
            for wfd in readable:
                path = by_fd[wfd]
                self._unwatch(path)
                self.safely("reap", self._reap_if_dead, path, "worker exited")

    def read_event(self) -> tuple[dict, str] | None:
        """childutils' wait(), except that end of input returns ``None``."""
        childutils.listener.ready(self.stdout)
        self.wait_for_input()
        line = _text(self._blocking(self._input.readline))
        if not line:
            return None
        headers = childutils.get_headers(line)
        length = headers.get("len", "0")
        # Only plain digits: int() also takes "-1" (read(-1) would swallow every
        # later event until supervisord exits), "٣" and " 5"; and a bound, since a
        # huge len blocks until that much arrives, or overflows read() itself.
        if not (length.isascii() and length.isdigit()) or int(length) > MAX_PAYLOAD:
            raise ValueError(f"malformed header: len {length[:40]!r} is not a payload length")
        payload = _text(self._input.read(int(length)))
        return headers, payload

    def _on_term(self, signum, frame) -> None:
        self.stop_requested = True
        if self._waiting:
            # Only a blocking wait is interrupted; an event being handled (a
            # reap in its grace period) is finished first.
            self._waiting = False
            raise Stop()

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
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
                    if self.stop_requested:
                        raise Stop()
            except BrokenPipeError:
                self.log("exit", why="supervisord closed our stdout; workers left for the next sweep")
                return 0
            except Stop:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                self.log("stopping", why="SIGTERM")
                self.finish()
                return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.close()


def from_environment(environ: dict) -> tuple[Identity, object]:
    """Our supervisord's identity and RPC proxy; :class:`UsageError` (exit 2) outside one."""
    if "SUPERVISOR_SERVER_URL" not in environ or "SUPERVISOR_PROCESS_NAME" not in environ:
        raise UsageError("the listener must run under supervisord as an [eventlistener:x] section")
    ppid = os.getppid()
    ident = Identity.of(ppid)
    try:
        cmd = psutil.Process(ppid).cmdline()
    except psutil.Error:
        cmd = []
    if ident is None or not procs.runs_supervisord(cmd):
        raise UsageError("the listener's parent is not supervisord; run it as an [eventlistener:x] section")
    return ident, childutils.getRPCInterface(environ)


__all__ = ["Listener", "Identity", "parse_payload", "from_environment", "EXIT_USAGE"]
