"""``celery-supervise audit``: read the audit log back, one row per signal.

Each signal has an intent line (written before it was sent) and an outcome
line (after). A row joins the two; an intent without an outcome means the
run that wrote it died between the two (SIGKILLed mid-kill, a power cut):
the signal may or may not have gone out, and the row says so.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from ..processes import audit as auditing
from ..errors import EXIT_OK, SuperviseError, UsageError

#: An intent with no outcome: its run stopped between the two lines.
NO_OUTCOME = "no outcome (the run died mid-signal)"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AuditLogError(SuperviseError):
    def __init__(self, path: str, why: str):
        self.path = path
        super().__init__(f"cannot read the audit log {path}: {why}")


def parse_since(text: str, now: float) -> float:
    """``--since``: an epoch from ``10m``/``2h``/``1d`` (ago) or an ISO time (UTC unless it says)."""
    text = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise UsageError(f"--since {text!r}: give an ISO time (2026-12-03T14:00:00Z) or an age (30s, 10m, 2h, 1d)") \
            from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


@dataclass(frozen=True)
class Row:
    """One signal: what was intended and what came of it."""

    epoch: float
    time: str
    run: str
    verb: str
    argv: tuple[str, ...]
    uid: int | None
    record: str | None
    pid: int
    create_time: float | None
    cmdline: tuple[str, ...]
    signal: str
    reason: str
    outcome: str | None  # None: no outcome line (see NO_OUTCOME)

    def to_document(self) -> dict:
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["argv"], doc["cmdline"] = list(self.argv), list(self.cmdline)
        return doc


@dataclass
class AuditResult:
    path: str
    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_OK

    @property
    def unfinished(self) -> int:
        """Signals whose run died between intent and outcome."""
        return sum(r.outcome is None for r in self.rows)

    def to_document(self) -> dict:
        return {"path": self.path, "exit_code": self.exit_code, "signals": [r.to_document() for r in self.rows],
                "unfinished": self.unfinished, "warnings": self.warnings}


def _row(intent: dict | None, outcome: dict | None) -> Row:
    line = intent or outcome
    proc = line.get("process") or {}
    command = line.get("command") or {}
    return Row(
        epoch=float(line.get("epoch") or 0), time=str(line.get("time", "")), run=str(line.get("run", "")),
        verb=str(command.get("verb", "")), argv=tuple(command.get("argv") or ()), uid=line.get("uid"),
        record=line.get("record"), pid=int(proc.get("pid") or 0), create_time=proc.get("create_time"),
        cmdline=tuple(proc.get("cmdline") or ()), signal=str(line.get("signal", "")), reason=str(line.get("reason", "")),
        outcome=None if outcome is None else str(outcome.get("outcome")),
    )


def audit(path: str | None = None, *, since: str | None = None, pid: int | None = None,
          clock: Callable[[], float] = time.time) -> AuditResult:
    """The signals in the audit log at *path* (the default log when None), oldest first, filtered."""
    path = os.path.abspath(path or auditing.default_path())
    cutoff = None if since is None else parse_since(since, clock())
    result = AuditResult(path)
    try:
        lines, bad = auditing.read_lines(path)
    except FileNotFoundError:
        result.warnings.append(f"no audit log at {path} (nothing has been signalled with it yet)")
        return result
    except OSError as exc:
        raise AuditLogError(path, exc.strerror or str(exc)) from None
    if bad:
        result.warnings.append(f"{bad} line(s) of {path} are not audit lines and were skipped")
    for joined in auditing.join(lines):
        row = _row(joined["intent"], joined["outcome"])
        if cutoff is not None and row.epoch < cutoff:
            continue
        if pid is not None and row.pid != pid:
            continue
        result.rows.append(row)
    return result
