"""The listener's cgroup placement: each worker supervisord starts, in a cgroup of its own.

At ``PROCESS_STATE_STARTING`` (no pid in the event: supervisord is asked
for it) the new process is placed before its first task forks; at
``PROCESS_STATE_RUNNING`` (and every tick) one that was not is placed,
marked late. The cgroup itself is :mod:`celery_supervise.processes.cgroups`;
this decides *which* process may be moved, since a PID from an event is
never trusted to name anything but supervisord's own child (a bad or stale
one could name PID 1, and move the whole machine). docs/escapes.md has the
measured window.
"""

from __future__ import annotations

import fnmatch
import os
import time
from typing import Callable

from ..celery_side import discovery
from ..processes import cgroups, procs

#: How long STARTING waits for supervisord's new child to exec its command
#: (the event can arrive between the fork and the exec; it takes milliseconds).
EXEC_WAIT = 0.5


def ours(programs: list[str], program: str) -> bool:
    """Whether *program* is one the listener watches: it matches a ``--program`` glob (all, without any)."""
    short = program.split(":", 1)[-1]
    return not programs or any(fnmatch.fnmatchcase(program, p) or fnmatch.fnmatchcase(short, p) for p in programs)


class Placement:
    """Places workers for one listener; logs each program's mechanism once (through *log*)."""

    def __init__(self, mode: str, programs: list[str], parent: int, log: Callable[..., None],
                 monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.monotonic, self.sleep = monotonic, sleep
        self.mode = mode
        self.programs = programs  # the listener's --program globs (empty: every program)
        self.parent = parent  # supervisord: only its direct child is ever placed
        self.log = log
        self._logged: dict[str, str] = {}  # program -> the mechanism last logged for it

    def supervised(self, program: str, pid: int) -> bool:
        """Whether *pid* is supervisord's own child, run for a watched *program*.

        supervisord forks every program process itself, so an event's PID
        that is not its child (PID 1 from a malformed event, a stale one
        since recycled) names somebody else's tree: a walk down from it
        found the first Celery worker there, another project's as readily
        as ours, and the listener recorded it under the event's program.
        """
        if not pid or pid == os.getpid() or not ours(self.programs, program):
            return False
        root = procs.read_proc(pid)
        return root is not None and root.ppid == self.parent

    def at_starting(self, rpc, program: str) -> None:
        """STARTING: ask supervisord for the PID it just forked, place it if it is a worker's."""
        if self.mode == cgroups.OFF or rpc is None or not ours(self.programs, program):
            return
        # supervisord emits STARTING from spawn(), after the fork: the PID exists.
        try:
            pid = int(rpc.supervisor.getProcessInfo(program).get("pid") or 0)
        except Exception as exc:  # any transport failure or Fault (shutting down): RUNNING places it late
            self.log("warning", program=program, warning=f"cannot ask supervisord for its PID: {exc}")
            return
        if pid and self._worker_program(pid):
            self.place(program, pid, late=False)

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
        # A fast listener reads STARTING while the child still runs
        # supervisord's own code (fork, then fds, setuid, chdir, exec): wait,
        # bounded, for the exec, then judge the command it runs.
        parent = procs.read_proc(self.parent)
        deadline = self.monotonic() + EXEC_WAIT
        while (found is not None and parent is not None and found.ppid == self.parent
               and found.cmdline == parent.cmdline and self.monotonic() < deadline):
            self.sleep(0.005)
            found = procs.read_proc(pid)
        return found is not None and discovery.parse_worker_cmdline(found.cmdline) is not None

    def place(self, program: str, pid: int, *, late: bool, main: int | None = None) -> None:
        """Place the process supervisord started for *program* in a cgroup of its own.

        Its current descendants (the worker's pool, when we place it at
        RUNNING, or at STARTING delivered late) are moved too: what they fork
        from now on is covered. Having any makes the placement late: what
        they forked before and already left the tree is not covered.
        """
        if self.mode == cgroups.OFF or pid == os.getpid():
            return
        if cgroups.of_worker(main or pid, self.mode)[0] is not None:
            return  # placed already (at STARTING, or by `celery-supervise contain`)
        root = procs.read_proc(pid)
        # Only supervisord's direct child: never PID 1, never anything an event misnames.
        if root is None or root.ppid != self.parent:
            return
        also = [p.pid for p in procs.walk(root)]
        late = late or bool(also)
        try:
            cg = cgroups.place(pid, program, parent_pid=self.parent, late=late, also=also, mode=self.mode)
        except cgroups.CgroupUnavailable as exc:
            self._log_once(program, pid, cgroups.describe(None, str(exc)))
            return
        self._log_once(program, pid, cgroups.describe(cg, None))

    def _log_once(self, program: str, pid: int, mechanism: str) -> None:
        # Once per program and mechanism: a host without cgroups would
        # otherwise repeat the same line at every start and tick.
        if self._logged.get(program) != mechanism:
            self._logged[program] = mechanism
            self.log("containment", program=program, pid=pid, mechanism=mechanism)
