"""``celery-supervise contain -- CMD...``: enter a cgroup of its own, then exec the worker.

Put in front of the worker's command in its ``[program:]`` section. The
wrapper moves itself into ``<supervisord's cgroup>/celery-supervise/
<program>@<pid>.<ticks>`` and only then execs *CMD*, so the worker and
everything it ever forks are members from their first instruction: no
window at all, where the listener's placement at PROCESS_STATE_STARTING
has one of a few milliseconds (see docs/escapes.md).

It never keeps the worker from starting: where cgroups cannot be used
(no v2 mount, not delegated, ``--cgroups off``) it says why on stderr, in
one line, and execs *CMD* all the same: the worker then runs under the
process-group mechanism alone, as it would without the wrapper.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping, Sequence, TextIO

from ..processes import cgroups
from ..errors import UsageError


def program_name(environ: Mapping[str, str]) -> str:
    """supervisord's name for the process it runs (``group:name``, or ``name`` alone)."""
    name = environ.get("SUPERVISOR_PROCESS_NAME") or "contained"
    group = environ.get("SUPERVISOR_GROUP_NAME") or name
    return name if group == name else f"{group}:{name}"


def contain(argv: Sequence[str], mode: str = cgroups.AUTO, *, environ: Mapping[str, str] = os.environ,
            execvp: Callable[[str, list[str]], None] = os.execvp, err: TextIO = sys.stderr) -> str:
    """Place this process, then exec *argv*; returns the mechanism line only if exec is a seam that returns."""
    if not argv:
        raise UsageError("contain needs the worker's command after --, e.g. contain -- celery -A proj worker")
    if mode not in cgroups.MODES:
        raise UsageError(f"--cgroups: {mode!r} is not one of {', '.join(cgroups.MODES)}")
    try:
        line = cgroups.describe(cgroups.enter_self(program_name(environ), mode), None)
    except cgroups.CgroupUnavailable as exc:
        line = cgroups.describe(None, str(exc))
        err.write(f"celery-supervise contain: {line}\n")
        err.flush()
    try:
        execvp(argv[0], list(argv))
    except OSError as exc:
        raise UsageError(f"contain: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    return line
