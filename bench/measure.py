"""Timing, statistics and the one results table, shared by every benchmark.

A benchmark module returns plain data: one or more :class:`Row` objects,
each holding the raw samples of "ours" and of the baseline, in seconds. This
module turns them into medians and ranges and into the markdown table that
``bench/run.py`` prints. Apart from :func:`run_child`, which runs one
command and reports its wall and CPU time, nothing here spawns or signals a
process.

The rules every row follows (see bench/README.md):

* N ≥ 5 samples a side (restart rows: N ≥ 3); :data:`MIN_N` says so, and a
  row with fewer says it in the table;
* ours and the baseline alternate run by run (:func:`order`), so a drift in
  the machine's load shifts both sides alike;
* a row whose two min–max ranges overlap claims no difference: its ratio
  says "ranges overlap: no claim", and a target that claims a win over the
  baseline (a ratio target below 1) is reported as NO CLAIM, not PASS.
"""

from __future__ import annotations

import os
import resource
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

#: Fewest samples a side for a row to count, and for restart rows.
MIN_N = 5
MIN_N_RESTART = 3

OVERLAP = "ranges overlap: no claim"


@dataclass(frozen=True)
class Target:
    """What "good enough" means for a row.

    *seconds*: our median must be at most this many seconds; *ratio*: our
    median divided by the baseline's must be at most this. Either or both;
    neither: the row only reports.
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

    @property
    def empty(self) -> bool:
        return self.seconds is None and self.ratio is None

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
    unit: str = "s"  # "s" (seconds), "MB", "%" or "" (a count)
    min_n: int = MIN_N
    load: tuple[float, float] | None = None  # the 1-minute load average before and after
    #: What the verdict compares with the target when it is not our median
    #: (the idle CPU: the whole run's average, not its median window).
    judged: float | None = None
    judged_label: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.ours or not self.baseline or median(self.baseline) <= 0:
            return None
        return median(self.ours) / median(self.baseline)

    @property
    def overlap(self) -> bool:
        """Whether the min–max ranges of the two sides overlap."""
        if not self.ours or not self.baseline:
            return False
        return max(min(self.ours), min(self.baseline)) <= min(max(self.ours), max(self.baseline))

    @property
    def verdict(self) -> str:
        if self.skipped or not self.ours:
            return "SKIP"
        if self.target.empty:
            return "-"
        ours = median(self.ours) if self.judged is None else self.judged
        if not self.target.met(ours, self.ratio):
            return "MISS"
        if self.overlap and self.target.ratio is not None and self.target.ratio < 1:
            return "NO CLAIM"  # a win over the baseline that the ranges do not support
        return "PASS"

    @property
    def too_few(self) -> bool:
        return any(0 < len(side) < self.min_n for side in (self.ours, self.baseline))


def order(i: int, sides: Sequence[str] = ("ours", "baseline")) -> tuple[str, ...]:
    """The order of the sides in run *i*: rotated by one each run (two sides: alternating)."""
    k = i % len(sides)
    return tuple(sides[k:]) + tuple(sides[:k])


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Run *fn* once; return (seconds elapsed on the monotonic clock, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads), to the microsecond."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Child:
    """One finished command: its wall time, its CPU time (user + system) and its output."""

    wall: float
    cpu: float
    returncode: int
    stdout: bytes
    stderr: bytes


def run_child(argv: list[str], *, cwd: str | None = None, env: dict | None = None, timeout: float = 60.0) -> Child:
    """Run *argv*; measure its wall time and, through ``wait4``, its own CPU time.

    The CPU time is the child's user + system time (and that of any child
    it waited for), as the kernel accounts it: not this process's, not the
    broker's or the worker's. Output goes to temporary files, so a chatty
    command never blocks on a pipe. After *timeout* seconds it is killed
    through a pidfd (never a PID that may have been reused) and the result
    says so with a return code of -9.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        pidfd = os.pidfd_open(proc.pid)  # our unreaped child: the PID is still its own
        timer = threading.Timer(timeout, _kill_quietly, (pidfd,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            timer.join()
            os.close(pidfd)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return Child(wall, usage.ru_utime + usage.ru_stime, proc.returncode, out.read(), err.read())


def _kill_quietly(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def bytecode_cache_on() -> None:
    """Let the commands measured here write and use ``__pycache__``.

    ``PYTHONDONTWRITEBYTECODE`` (set on this project's machine) makes every
    fresh process compile the modules that have no ``.pyc`` yet, here this
    project's own (an editable install): ~0.1 s per command that a real
    installation, compiled by pip, never pays. Both sides of every row run
    without it, after an unmeasured warm-up run.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def purge_redis(url: str, uid: str) -> None:
    """Delete every key of *url*'s database that names *uid* (one run's queues, results and bindings)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        for key in client.scan_iter(match=f"*{uid}*"):
            client.delete(key)
    finally:
        client.close()


def load_average() -> float:
    return os.getloadavg()[0]


def format_seconds(s: float) -> str:
    a = abs(s)
    if a < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if a < 1.0:
        return f"{s * 1e3:.1f} ms" if a < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def format_value(v: float, unit: str = "s") -> str:
    if unit == "s":
        return format_seconds(v)
    if unit == "MB":
        return f"{v:.1f} MB"
    if unit == "%":
        return f"{v:.3f} %" if v < 0.1 else f"{v:.2f} %"
    return f"{v:g}"


def summary(samples: list[float], unit: str = "s") -> str:
    """``median (min–max, N=n)``."""
    if not samples:
        return "-"
    f = lambda v: format_value(v, unit)  # noqa: E731
    return f"{f(median(samples))} ({f(min(samples))}–{f(max(samples))}, N={len(samples)})"


def ratio_cell(row: Row) -> str:
    ratio = row.ratio
    if ratio is None:
        return "-"
    return f"{ratio:.2f}× ({OVERLAP})" if row.overlap else f"{ratio:.2f}×"


def table(rows: list[Row]) -> str:
    """The markdown table, then one footnote line per note."""
    head = ["benchmark", "ours", "median (min–max, N)", "baseline", "median (min–max, N)", "ratio", "target",
            "result", "load before→after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes = []
    for i, row in enumerate(rows, 1):
        extra = []
        if row.too_few:
            extra.append(f"fewer than {row.min_n} samples a side: this row rests on too few runs")
        mark = f" [{i}]" if row.notes or row.skipped or extra else ""
        load = f"{row.load[0]:.2f}→{row.load[1]:.2f}" if row.load else "-"
        if row.skipped:
            cells = [row.name + mark, row.ours_label, "-", row.baseline_label, "-", "-", str(row.target),
                     "SKIP", load]
        else:
            ours = summary(row.ours, row.unit)
            if row.judged is not None:
                ours += f"; {row.judged_label or 'judged'}: {format_value(row.judged, row.unit)}"
            cells = [
                row.name + mark,
                row.ours_label,
                ours,
                row.baseline_label,
                summary(row.baseline, row.unit),
                ratio_cell(row),
                str(row.target),
                row.verdict,
                load,
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        for text in ([f"skipped: {row.skipped}"] if row.skipped else []) + extra + row.notes:
            notes.append(f"[{i}] {text}")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)
