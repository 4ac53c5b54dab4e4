"""Timing, statistics and the one results table, shared by every benchmark.

A benchmark module returns plain data: one or more :class:`Row` objects,
each holding the raw samples of "ours" and of the baseline, in seconds. This
module turns them into medians and ranges and into the markdown table that
``bench/run.py`` prints. Nothing here spawns or signals a process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Target:
    """What "good enough" means for a row.

    *seconds*: our median must be at most this many seconds; *ratio*: our
    median divided by the baseline's must be at most this. Either or both.
    """

    seconds: float | None = None  # in the row's unit: seconds unless the row says otherwise
    ratio: float | None = None
    unit: str = "s"

    def __str__(self) -> str:
        parts = []
        if self.seconds is not None:
            parts.append(f"ours ≤ {format_value(self.seconds, self.unit)}")
        if self.ratio is not None:
            parts.append(f"ours ≤ {self.ratio:g}× baseline")
        return ", ".join(parts) or "-"

    def met(self, ours: float, ratio: float | None) -> bool:
        if self.seconds is not None and ours > self.seconds:
            return False
        if self.ratio is not None and (ratio is None or ratio > self.ratio):
            return False
        return True


@dataclass
class Row:
    """One line of the table: what was measured, both sides' samples, the target."""

    name: str
    ours_label: str
    baseline_label: str
    target: Target
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the row could not be measured
    unit: str = "s"  # "s" (seconds), "MB" or "" (a count)

    @property
    def ratio(self) -> float | None:
        if not self.ours or not self.baseline or median(self.baseline) <= 0:
            return None
        return median(self.ours) / median(self.baseline)

    @property
    def verdict(self) -> str:
        if self.skipped or not self.ours:
            return "SKIP"
        return "PASS" if self.target.met(median(self.ours), self.ratio) else "MISS"


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Run *fn* once; return (seconds elapsed on the monotonic clock, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def format_value(v: float, unit: str = "s") -> str:
    if unit == "s":
        return format_seconds(v)
    if unit == "MB":
        return f"{v:.1f} MB"
    return f"{v:g}"


def summary(samples: list[float], unit: str = "s") -> str:
    """``median (min–max, N=n)``."""
    if not samples:
        return "-"
    f = lambda v: format_value(v, unit)  # noqa: E731
    return f"{f(median(samples))} ({f(min(samples))}–{f(max(samples))}, N={len(samples)})"


def table(rows: list[Row]) -> str:
    """The markdown table, then one footnote line per note."""
    head = ["benchmark", "ours", "median (min–max)", "baseline", "median (min–max)", "ratio", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes = []
    for i, row in enumerate(rows, 1):
        mark = f" [{i}]" if row.notes or row.skipped else ""
        if row.skipped:
            cells = [row.name + mark, row.ours_label, "-", row.baseline_label, "-", "-", str(row.target),
                     "SKIP"]
        else:
            ratio = row.ratio
            cells = [
                row.name + mark,
                row.ours_label,
                summary(row.ours, row.unit),
                row.baseline_label,
                summary(row.baseline, row.unit),
                f"{ratio:.2f}×" if ratio is not None else "-",
                str(row.target),
                row.verdict,
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        for text in ([f"skipped: {row.skipped}"] if row.skipped else []) + row.notes:
            notes.append(f"[{i}] {text}")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)
