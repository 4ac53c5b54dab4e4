"""The supervisord eventlistener: snapshot on every start and stop, reap after.

Runs as ``[eventlistener:celery-supervise]`` subscribed to
``PROCESS_STATE,SUPERVISOR_STATE_CHANGE,TICK_60``. stdout carries only the
listener protocol (through :mod:`supervisor.childutils`); every action is one
JSON line on stderr.

What it does on each event:

* ``PROCESS_STATE_STARTING``: place the worker in a cgroup of its own
  (:mod:`celery_supervise.supervisord.placement`) before its first task forks.
* ``PROCESS_STATE_RUNNING`` (and every tick): place it (late) if not yet, record
  the worker's identity, its supervisord's identity and its current tree in ``STATE_DIR``.
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

import json
import os
import select
import sys
import time
from dataclasses import replace
from typing import Callable, Iterable, TextIO

import psutil

from .celery_side import control, discovery, task_json
from .commands import kill as kill_verb, savepid as savepid_verb
from .errors import EXIT_USAGE, SuperviseError, SupervisorError
from .processes import audit as auditing, cgroups, kill as killing, procs, snapshot, statefile
from .processes.plan import Policy
from .processes.procs import Identity
from .processes.revisit import with_cgroup_members
from .processes.snapshot import Task
from .supervisord import placement, protocol, records as folder, rpc as rpcs
from .supervisord.protocol import from_environment, parse_payload
from .supervisord.records import RECORD_SUFFIX, merged
from .supervisord.watching import RETRY_EVERY, RETRY_FOR, Pending, Pidfds

STOP_EVENTS = {"PROCESS_STATE_STOPPED", "PROCESS_STATE_EXITED", "PROCESS_STATE_BACKOFF", "PROCESS_STATE_FATAL"}
STOPPING_TASKS_TIMEOUT = 0.5  # a STOPPING event must not hold the listener up for long
# Between events, re-read the recorded trees this often and rewrite a record
# whose tree grew: a worker that crashes (no STOPPING event) is then reaped
# by a tree at most this old, not one from its start or the last tick.
REFRESH_INTERVAL = 2.0


class Listener(protocol.Loop):
    """Handles supervisord events; streams, clocks, sleep and RPC are passed in for tests.

    *wait* blocks between events on stdin and the watched workers' pidfds;
    an in-memory stdin (a test's) cannot be waited on, so it is passed with
    ``wait=False``.
    """

    def __init__(
        self,
        *,
        state_dir: str,
        programs: Iterable[str] = (),
        grace: float = kill_verb.DEFAULT_GRACE,
        policy: Policy = Policy(),
        app=None,
        app_spec: str | None = None,
        supervisor: Identity | None = None,
        rpc=None,
        rpc_url: str = "supervisord",
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
        stderr: TextIO = sys.stderr,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wait: bool = True,
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
        self.rpc_url = rpc_url
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        # Read bytes when we can: the header's len counts bytes, not characters.
        self._input = getattr(stdin, "buffer", stdin)
        self.clock = clock  # the wall clock, for the log and the reports' names
        self.monotonic = monotonic  # for the waits
        self.sleep = sleep
        self.wait = wait
        self.refresh_interval = refresh_interval
        self.cgroup_mode = cgroup_mode
        parent = supervisor.pid if supervisor else os.getppid()  # the only process whose child is placed
        self.placement = placement.Placement(cgroup_mode, self.programs, parent, self.log)
        self.stop_requested = False
        self._waiting = False  # blocked on input: SIGTERM may interrupt
        self._watches = Pidfds()
        self._last: dict[str, snapshot.Worker] = {}  # record path -> what it holds now
        self.pending = Pending()  # RUNNING processes that have not exec'd Celery yet

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
        return folder.record_path(self.state_dir, program, pid)

    def records(self, program: str | None = None) -> list[str]:
        try:
            return folder.listing(self.state_dir, program)
        except OSError as exc:
            self.log("error", error=f"cannot list {self.state_dir}: {exc}")
            return []

    def watched(self, program: str, pid: int | None) -> int | None:
        """The worker main PID if *program* is one we watch and *pid* our supervisord's child, else ``None``."""
        if not self.placement.supervised(program, pid):
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
        program = protocol.program_name(fields)
        # STARTING, BACKOFF and FATAL carry no pid at all.
        raw_pid = fields.get("pid", "")
        pid = int(raw_pid) if raw_pid.isdigit() else 0
        if event == "PROCESS_STATE_STARTING":
            self.placement.at_starting(self.rpc, program)  # STARTING carries no pid: it asks supervisord
        elif event == "PROCESS_STATE_RUNNING":
            main = self.watched(program, pid)
            self.pending.drop(program)
            if main is None and self.placement.supervised(program, pid) and discovery.runs_worker_wrapper(pid):
                # Not a worker yet (a wrapper that has not exec'd it): asked again, see supervisord.watching.
                self.pending.add(program, fields, Identity.of(pid), self.monotonic())
            if main is not None:
                self.placement.place(program, pid, late=True, main=main)
                stale = [p for p in self.records(program) if not p.endswith(f"@{main}{RECORD_SUFFIX}")]
                self.settle(stale, "replaced by a new start", replaced=True)
                self.record(program, main, why or event)
        elif event == "PROCESS_STATE_STOPPING":
            main = self.watched(program, pid)
            if main is not None:
                self.record(program, main, why or event, tasks=True)
        elif event in STOP_EVENTS:
            self.pending.drop(program)
            # Whatever pid the event names (a wrapper's, or none), every
            # record of this program whose worker is dead has leftovers to reap.
            for path in self.records(program):
                if self._main_dead(path):
                    self.reap(path, event)

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
        worker = with_cgroup_members(worker, self.cgroup_mode)
        path = self.record_path(program, main_pid)
        last = self._last.get(path)
        if last is not None and not last.main.same_process(worker.main):
            last = None  # the PID now names another worker
        if last is not None:
            worker = merged(worker, last)
        if if_changed and last is not None and folder.identities(worker) <= folder.identities(last) \
                and last.cgroup == worker.cgroup:
            return
        command = discovery.parse_worker_cmdline(worker.main.cmdline)
        node = command.node if command else None
        found_tasks = last.tasks if last is not None else ()
        if tasks and self.app is not None and command is not None:
            found_tasks = self._active_tasks(main_pid, command) or found_tasks
        worker = replace(worker, node=node, app=command.app if command else None, program=program, tasks=found_tasks)
        # savepid's own record, with our supervisord's identity in it.
        savepid_verb.record(path, snapshot.take([worker], "listener"), self.policy, supervisor=self.supervisor)
        self._last[path] = worker
        self._watch(path, worker.main)
        self.log("recorded", program=program, pid=main_pid, why=why, processes=len(worker.procs),
                 tasks=len(found_tasks))

    def refresh_changed(self) -> None:
        """Rewrite the record of every worker we watch that has a new process.

        A tree is walked again only when :func:`procs.tree_grew` says a walk
        could find a process its record lacks (why that misses nothing is
        written there): idle, that is two small reads per process instead
        of a whole snapshot per worker every :data:`REFRESH_INTERVAL`.
        """
        for w in list(self._last.values()):
            if not procs.tree_grew(w.procs):
                continue
            self.safely("refresh", lambda: self.record(w.program or "?", w.main.pid, "tree grew", if_changed=True))

    def retry_pending(self) -> None:
        """Record the pending RUNNING processes that have exec'd Celery since (see supervisord.watching)."""
        live, expired = self.pending.due(self.monotonic())
        for program, entry in expired:
            self.log("warning", program=program, pid=entry.pid,
                     warning=f"RUNNING but not a Celery worker after {RETRY_FOR:g}s; left to the ticks")
        for program, entry in live:
            if self.watched(program, entry.pid) is not None:
                self.safely("retry", self.on_process_state, "PROCESS_STATE_RUNNING", entry.fields,
                            "PROCESS_STATE_RUNNING (exec'd since)")

    def _active_tasks(self, main_pid: int, command) -> tuple[Task, ...]:
        try:
            replies = control.active_tasks(self.app, command.node, STOPPING_TASKS_TIMEOUT)
        except SuperviseError as exc:
            self.log("warning", pid=main_pid, warning=f"no active tasks recorded: {exc}")
            return ()
        return tuple(Task.from_reply(t) for t in replies if isinstance(t, dict))

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
            infos = rpcs.call(self.rpc_url, self.rpc.supervisor.getAllProcessInfo)
        except SupervisorError as exc:  # the events will catch up
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
            if rec is None or not rec.snapshot.workers or not self._ours(folder.supervisor_of(rec)):
                continue
            worker = rec.snapshot.workers[0]
            if worker.main.identity.alive():
                self.record(worker.program or "?", worker.main.pid, "tick")

    def _load(self, path: str):
        rec, refusal = folder.load(path)
        if refusal is not None:
            self.log("refused", record=path, error=refusal)
            self._unwatch(path)
            folder.set_aside(path)
        return rec

    def _ours(self, sup: Identity | None) -> bool:
        """Whether a record's supervisord is ours (both unknown counts, as in tests without one)."""
        return sup.same(self.supervisor) if sup is not None else self.supervisor is None

    def _main_dead(self, path: str) -> bool:
        rec = self._load(path)
        if rec is None:
            return False
        main = rec.snapshot.workers[0].main if rec.snapshot.workers else None
        return main is None or not main.identity.alive()

    # ------------------------------------------------------------- pidfds

    def _watch(self, path: str, main: procs.Proc) -> None:
        """Hold a pidfd of *main*, so that its exit wakes the wait for input."""
        self._watches.add(path, main.pid, lambda: killing.alive(main))

    def _unwatch(self, path: str) -> None:
        self._last.pop(path, None)
        self._watches.remove(path)

    def close(self) -> None:
        self._watches.close()
        self._last.clear()

    # ---------------------------------------------------------------- reap

    def reap(self, path: str, why: str) -> None:
        """Kill what a stopped worker left, write the report, drop the record."""
        self._unwatch(path)
        rec = self._load(path)
        if rec is None:
            return
        try:
            result = kill_verb.kill(path, grace=self.grace, audit=auditing.AuditLog("listener"),
                                    cgroup_mode=self.cgroup_mode)
        except SuperviseError as exc:
            if not os.path.lexists(path):
                return  # another reaper got there first, under the lock
            self.log("error", record=path, error=str(exc))
            return
        doc = result.to_document()
        doc["why"] = why
        doc["tasks"] = [t.__dict__ for w in rec.snapshot.workers for t in w.tasks]
        report_path = folder.report_path(path, self.clock())
        statefile.write(report_path, doc, task_json.Encoder)
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
            if not main.identity.alive():
                self.reap(path, f"{why}: worker gone")
                continue
            sup = folder.supervisor_of(rec)
            if sup is not None and not sup.alive():
                orphans.append((path, main, f"{why}: orphaned (its supervisord {sup.pid} is gone)"))
            elif replaced and self._ours(sup):
                orphans.append((path, main, f"{why}: still running"))
        if orphans:
            self.warm_stop(orphans)
            for path, _, reason in orphans:
                self.reap(path, reason)

    def warm_stop(self, orphans: list[tuple[str, procs.Proc, str]]) -> None:
        """SIGTERM the mains alone (Celery's warm shutdown), wait up to --grace for them (``kill.warm_stop``)."""
        mains = [main for _, main, _ in orphans]
        audit = auditing.AuditLog("listener", records={main.pid: path for path, main, _ in orphans})
        for main, result in zip(mains, killing.warm_stop(mains, self.grace, audit, self.monotonic, self.sleep)):
            self.log("warm-stop", pid=main.pid, result=result, grace=self.grace)
        if audit.error:
            self.log("warning", warning=audit.warning())

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

    def wait_for_input(self) -> None:
        """Block until stdin is readable, reaping watched workers that exit meanwhile.

        Every *refresh_interval* seconds of waiting, the watched trees are
        re-read too.
        """
        if not self.wait:
            return
        fd = self._input.fileno()
        next_refresh = self.monotonic() + self.refresh_interval
        while True:
            by_fd = self._watches.by_fd()
            timeout = max(0.0, next_refresh - self.monotonic()) if self._last else None
            if self.pending:
                timeout = min(timeout if timeout is not None else RETRY_EVERY, RETRY_EVERY)
            readable, _, _ = self._blocking(select.select, [fd, *by_fd], [], [], timeout)
            if fd in readable:
                return  # the event first: it may be end of input, and then we touch nothing
            if not readable and self.pending:
                self.retry_pending()
            if not readable and self.monotonic() >= next_refresh:
                self.refresh_changed()
                next_refresh = self.monotonic() + self.refresh_interval
            for wfd in readable:
                path = by_fd[wfd]
                self._unwatch(path)
                self.safely("reap", self._reap_if_dead, path, "worker exited")


__all__ = ["Listener", "Identity", "parse_payload", "from_environment", "EXIT_USAGE"]
