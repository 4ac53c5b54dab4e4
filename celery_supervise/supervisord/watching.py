"""What the listener waits on between events: its workers' pidfds, and processes that are not workers yet.

:class:`Pidfds`: a pidfd of every recorded worker main, so that its exit
wakes the listener's wait for input within milliseconds (the STOPPED event
comes up to a second later).

:class:`Pending`: watched programs whose RUNNING process has not exec'd
Celery yet; the listener asks again until it has.

supervisord says RUNNING once ``startsecs`` have passed, whatever the
process runs by then. A program started through a wrapper that execs the
worker (``celery-supervise contain -- celery …``, which ``print-config
--contain`` writes; ``newrelic-admin run-program``; a shell's ``exec``)
may still be the wrapper at that moment, above all on a loaded host: the
process is not a Celery worker yet, and nothing can be recorded. Without a
retry its record waited for the next ``TICK_60``, and a ``kill -9`` of
supervisord in between left a worker nobody had recorded (its leftovers
then outlived it).

The entry holds the process's identity (PID + creation time): a PID that
now names another process is dropped, never recorded. After
:data:`RETRY_FOR` seconds the entry is dropped too, and the ticks'
``getAllProcessInfo`` is the fallback, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..processes.procs import Identity

#: How often the listener looks again while an entry is pending.
RETRY_EVERY = 0.25
#: How long it keeps looking before leaving it to the ticks.
RETRY_FOR = 60.0


class Pidfds:
    """record path -> pidfd of its worker main."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def add(self, path: str, pid: int, still_that_process: Callable[[], bool]) -> None:
        if path in self.fds:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone already, or no pidfd here: the events and sweeps still reap
        # Opened after the snapshot: make sure the number still names that process.
        if not still_that_process():
            os.close(fd)
            return
        self.fds[path] = fd

    def remove(self, path: str) -> None:
        fd = self.fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def by_fd(self) -> dict[int, str]:
        return {fd: path for path, fd in self.fds.items()}

    def close(self) -> None:
        for path in list(self.fds):
            self.remove(path)


@dataclass(frozen=True)
class Entry:
    fields: dict  # the RUNNING event's payload fields (groupname, processname, pid)
    identity: Identity | None  # None: gone already when RUNNING was handled
    give_up_at: float  # on the listener's monotonic clock

    @property
    def pid(self) -> int:
        return self.identity.pid if self.identity is not None else 0


class Pending:
    """At most one entry per program process, the latest RUNNING's."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, program: str, fields: dict, identity: Identity | None, now: float) -> None:
        self._entries[program] = Entry(dict(fields), identity, now + RETRY_FOR)

    def drop(self, program: str) -> None:
        self._entries.pop(program, None)

    def due(self, now: float, alive: Callable[[Identity], bool] = Identity.alive
            ) -> tuple[list[tuple[str, Entry]], list[tuple[str, Entry]]]:
        """``(still pending, expired)``; the expired, the gone and the recycled PIDs are dropped.

        *alive(identity)* says whether that very process still runs.
        """
        live, expired = [], []
        for program, entry in list(self._entries.items()):
            if now >= entry.give_up_at:
                expired.append((program, entry))
            elif entry.identity is not None and alive(entry.identity):
                live.append((program, entry))
                continue
            del self._entries[program]
        return live, expired
