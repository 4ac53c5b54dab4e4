"""One reaper at a time on a host.

The eventlistener and a deploy script can both decide to reap the same
worker at the same moment. Each kill is idempotent on its own (identity is
re-checked before every signal, and "no such process" counts as gone), but
two interleaved TERM/wait/KILL rounds would report each other's work and
could KILL what the other still grants a grace period. So every kill holds
an exclusive ``flock`` for its whole duration.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time

from ..errors import SuperviseError

LOCK_ENV = "CELERY_SUPERVISE_LOCK"
DEFAULT_WAIT = 60.0


def lock_path() -> str:
    return os.environ.get(LOCK_ENV) or os.path.join(tempfile.gettempdir(), f"celery-supervise-{os.geteuid()}.lock")


def flock_within(fd: int, wait: float, message: str, clock=time.monotonic, sleep=time.sleep) -> None:
    """Take an exclusive ``flock`` on *fd*, polling; :class:`SuperviseError` (*message*) after *wait* s."""
    deadline = clock() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if clock() >= deadline:
                raise SuperviseError(message) from None
            sleep(0.05)


@contextlib.contextmanager
def reaper_lock(wait: float = DEFAULT_WAIT, clock=time.monotonic, sleep=time.sleep):
    """Hold the host-wide reaper lock; :class:`SuperviseError` after *wait* seconds."""
    path = lock_path()
    try:
        # O_NOFOLLOW and the owner check: in a shared /tmp somebody else could
        # have planted the name.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SuperviseError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            raise SuperviseError(f"lock file {path} is not a regular file of ours; refusing")
        flock_within(fd, wait, f"another celery-supervise kill has held {path} for {wait:g}s; giving up",
                     clock, sleep)
        yield
    finally:
        os.close(fd)  # closing releases the lock
