"""The boot time behind every creation time, and the id of this boot.

Split from :mod:`celery_supervise.processes.procs`, which re-exports all
of it (``procs.boot_time()`` and the rest are what callers use).
"""

from __future__ import annotations

import re


def _read(path: str) -> bytes:
    with open(path, "rb") as f:  # read once per process, or once per snapshot
        return f.read()


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

_base: float | None = None  # the boot time this process computes every identity with


def boot_time() -> float:
    """The boot time behind every creation time this process computes.

    The kernel counts a process's start in clock ticks since boot, which
    never changes; psutil turns it into wall-clock time by adding
    ``/proc/stat``'s ``btime`` (:func:`read_btime`). But ``btime`` is *derived* from the
    realtime clock (now minus the time since boot), so it moves whenever the
    clock is set: by hand, by an NTP step, even by a slew across a second
    boundary. Read fresh each time, the same process would get two
    creation times and look like a PID reuse. So it is read once per
    process: every identity this process computes, in a kill's grace wait
    or over a listener's months, agrees with every other one. A record
    written by another process carries the base it used, and
    :func:`celery_supervise.processes.statefile.parse` rebases it to ours.
    """
    global _base
    if _base is None:
        _base = read_btime()
    return _base


_BTIME = re.compile(rb"^btime\s+(\d+)", re.M)


def read_btime() -> float:
    """``/proc/stat``'s ``btime`` now, read fresh (see :func:`boot_time`).

    Read here rather than with ``psutil.boot_time()``: before psutil 7.1,
    that call also replaced the boot time psutil itself computes every
    ``Process.create_time()`` and ``is_running()`` with, so reading it
    after the clock was set made every process the host program (the
    listener's, a user's app, a test) had already looked at with psutil
    seem replaced by another.
    """
    match = _BTIME.search(_read("/proc/stat"))
    if match is None:
        raise OSError("/proc/stat has no btime line")
    return float(match.group(1))


def boot_id() -> str | None:
    """The kernel's random id of this boot, or ``None`` where it cannot be read.

    Unlike the boot time, it does not move with the clock, and it changes on
    every boot: it is what tells a record from before a reboot.
    """
    try:
        return _read(BOOT_ID_PATH).decode().strip() or None
    except OSError:
        return None
