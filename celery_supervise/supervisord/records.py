"""The listener's record folder: one state file per worker, and the reports of its reaps.

``STATE_DIR/PROGRAM@PID.json`` is a savepid record of one worker (with the
identity of its supervisord); ``STATE_DIR/PROGRAM@PID.STAMP.report.json``
is what the kill of its leftovers did.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace

from ..errors import SuperviseError
from ..processes import kill as killing, snapshot, statefile
from ..processes.procs import Identity

RECORD_SUFFIX = ".json"
REPORT_SUFFIX = ".report.json"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def record_path(state_dir: str, program: str, pid: int) -> str:
    return os.path.join(state_dir, f"{safe_name(program)}@{pid}{RECORD_SUFFIX}")


def listing(state_dir: str, program: str | None = None) -> list[str]:
    """The records in *state_dir* (of *program* only, if given); OSError if it cannot be listed."""
    prefix = f"{safe_name(program)}@" if program else ""
    return sorted(
        os.path.join(state_dir, n)
        for n in os.listdir(state_dir)
        if n.endswith(RECORD_SUFFIX) and not n.endswith(REPORT_SUFFIX) and n.startswith(prefix)
        and not n.startswith(".")
    )


def report_path(record: str, when: float) -> str:
    """Where the report of *record*'s reap at wall-clock *when* goes."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when))
    return record[: -len(RECORD_SUFFIX)] + f".{stamp}{REPORT_SUFFIX}"


def identities(worker: snapshot.Worker) -> set[tuple[int, float]]:
    return {(p.pid, p.create_time) for p in worker.procs}


def merged(now: snapshot.Worker, before: snapshot.Worker) -> snapshot.Worker:
    """*now*, plus the processes of *before* that still live but are no longer in the tree."""
    seen = {p.pid for p in now.procs}
    kept = [p for p in before.procs[1:] if p.pid not in seen and killing.alive(p)]
    if not kept:
        return now
    # Creation order puts every parent ahead of its children, as a record must.
    rest = sorted([*now.procs[1:], *kept], key=lambda p: p.create_time)
    return replace(now, procs=(now.main, *rest))  # keeps the rest of *now* (its cgroup too)


def load(path: str) -> tuple[statefile.Record | None, str | None]:
    """The record at *path*, or why it is refused; ``(None, None)`` when it is gone (reaped meanwhile)."""
    try:
        rec = statefile.read_here(path)
    except SuperviseError as exc:
        if not os.path.lexists(path):
            return None, None  # reaped meanwhile (by another listener or a deploy script)
        return None, str(exc)
    if isinstance(rec, statefile.LegacyRecord):
        return None, "not a listener record"
    return rec, None


def set_aside(path: str) -> None:
    """Move a refused record out of the way, so it is not re-read on every tick; kept for a human."""
    try:
        os.rename(path, path + ".invalid")
    except OSError:
        pass


def supervisor_of(rec: statefile.Record) -> Identity | None:
    """The supervisord a record names."""
    # From the parsed record, not the raw file: its creation time is
    # rebased like the workers', so a listener started after the clock
    # was set does not take a live supervisord for a dead one (and
    # warm-stop its workers as orphans).
    return Identity(*rec.supervisor) if rec.supervisor else None
