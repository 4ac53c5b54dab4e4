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
    pid: int
    create_time: float | None
    give_up_at: float  # on the listener's monotonic clock


class Pending:
    """At most one entry per program process, the latest RUNNING's."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, program: str, fields: dict, pid: int, create_time: float | None, now: float) -> None:
        self._entries[program] = Entry(dict(fields), pid, create_time, now + RETRY_FOR)

    def drop(self, program: str) -> None:
        self._entries.pop(program, None)

    def due(self, now: float, identity_of: Callable[[int], float | None],
            same: Callable[[float, float], bool]) -> tuple[list[tuple[str, Entry]], list[tuple[str, Entry]]]:
        """``(still pending, expired)``; the expired, the gone and the recycled PIDs are dropped.

        *identity_of(pid)* is the live process's creation time (``None``:
        gone); *same(a, b)* says whether two creation times are one process.
        """
        live, expired = [], []
        for program, entry in list(self._entries.items()):
            created = identity_of(entry.pid)
            if now >= entry.give_up_at:
                expired.append((program, entry))
            elif created is not None and entry.create_time is not None and same(created, entry.create_time):
                live.append((program, entry))
                continue
            del self._entries[program]
        return live, expired
