"""The requeue ledger: which recorded tasks were already sent again.

It lives beside the state file (``FILE.requeued``) and makes ``requeue``
idempotent: a task id in it is never sent twice. It belongs to one record:
it names the state file's host and ``taken_at``, and a ledger left by an
earlier record of the same name (the previous deploy's) counts as empty,
so a task requeued then, and cut off again since, is sent again now.

It is written and read under the state file's rules (atomic, 0600; not a
symbolic link, ours, not writable by others), since it decides what is
sent. A ledger that exists but cannot be trusted or parsed is an error,
never "empty": that would send everything again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

from ..processes import statefile
from ..processes.lock import flock_within
from ..errors import StateFileError

KIND = "celery-supervise/requeued"
SCHEMA = 1
SUFFIX = ".requeued"
#: How long a requeue waits for another one on the same state file.
LOCK_WAIT = 30.0


@dataclass
class Ledger:
    path: str
    host: str
    taken_at: float
    tasks: dict[str, dict] = field(default_factory=dict)  # task id -> what was sent, when

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self.tasks)

    def document(self, state_path: str) -> dict:
        return {"schema": SCHEMA, "kind": KIND, "state_file": os.path.abspath(state_path),
                "host": self.host, "taken_at": self.taken_at, "tasks": self.tasks}


def path_for(state_path: str) -> str:
    return state_path + SUFFIX


def read(state_path: str, *, host: str, taken_at: float) -> Ledger:
    """The ledger of the record *state_path* holds (host, taken_at); empty if none yet."""
    path = path_for(state_path)
    empty = Ledger(path, host, taken_at)
    try:
        data = statefile.read_bytes(path)
    except StateFileError as exc:
        if exc.problem == "no such file":
            return empty
        raise
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise StateFileError(path, "is not a valid requeue ledger (not JSON; truncated?); "
                                   "remove it only if you know which tasks were already sent") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("schema") != SCHEMA:
        raise StateFileError(path, "is not a celery-supervise requeue ledger of a known schema")
    tasks = doc.get("tasks")
    if not isinstance(tasks, dict):
        raise StateFileError(path, "has no tasks object")
    if doc.get("host") != host or doc.get("taken_at") != taken_at:
        return empty  # an earlier record's ledger: it says nothing about this one
    return Ledger(path, host, taken_at, {str(k): v if isinstance(v, dict) else {} for k, v in tasks.items()})


def save(ledger: Ledger, state_path: str) -> None:
    """Write *ledger* as it is (atomically, 0600); :class:`StateFileError` if it cannot be."""
    statefile.write(ledger.path, ledger.document(state_path))


def record_sent(ledger: Ledger, state_path: str, task_id: str, **details) -> None:
    """Add *task_id* to the ledger and write it at once (atomically, 0600)."""
    ledger.tasks[task_id] = {"sent_at": round(time.time(), 3), **details}
    save(ledger, state_path)


@contextlib.contextmanager
def exclusive(state_path: str, wait: float = LOCK_WAIT, clock=time.monotonic, sleep=time.sleep):
    """One requeue at a time per state file: an ``flock`` on the state file itself.

    The ledger cannot carry the lock: every write replaces it by a rename.
    """
    try:
        fd = os.open(state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        # statefile.read will say what is wrong with it, in its own words.
        yield
        return
    try:
        flock_within(fd, wait, f"another requeue of {state_path} has been running for {wait:g}s; giving up",
                     clock, sleep)
        yield
    finally:
        os.close(fd)
