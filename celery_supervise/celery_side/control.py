"""Celery's remote control, bounded and retried.

Two facts shape this module:

* ``inspect()``'s timeout is per reply, not a total deadline: without
  ``limit`` every call lasts at least the timeout. We always pass the number
  of replies we expect, so a call returns as soon as they are all in.
* kombu's filesystem transport creates a message file and only then writes
  it (kombu #1551), so a reader can parse an empty file and raise a
  ``JSONDecodeError``. A call that hits it is retried.

Never run two inspect calls at once on one app: they share one reply queue
and ``limit`` counts messages, so one call can swallow the other's reply.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from ..errors import AppError, BrokerError

log = logging.getLogger(__name__)

DECODE_RETRIES = 3
CONNECT_TIMEOUT = 2.0


def load_app(spec: str):
    """Load a Celery app from ``module``, ``module:attr`` or ``module.attr``.

    Uses Celery's own ``find_app``, so ``-A`` means what it means to
    ``celery -A``. The current directory is importable, as for ``celery``.
    """
    from celery.app.utils import find_app

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return find_app(spec)
    except Exception as exc:  # an import can fail in any way at all
        raise AppError(f"cannot load Celery app {spec!r}: {type(exc).__name__}: {exc}") from None


def connect(app, timeout: float = CONNECT_TIMEOUT):
    """A broker connection that has answered once, or :class:`BrokerError`.

    Celery's own control calls retry a dead broker for a long time; a deploy
    step must not hang on that, so we connect first with one bounded try.
    """
    try:
        # Creating the connection already imports the transport (redis-py,
        # amqp…), which can fail on its own.
        conn = app.connection_for_write()
    except Exception as exc:
        raise BrokerError(f"cannot use the broker {app.conf.broker_url!r}: {type(exc).__name__}: {exc}") from None
    try:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as exc:
        conn.release()
        raise BrokerError(f"broker {conn.as_uri()} did not answer: {exc}") from None
    return conn


def _retry_decode(what: str, call: Callable[[], Any]) -> Any:
    for attempt in range(1, DECODE_RETRIES + 1):
        try:
            return call()
        except ValueError as exc:  # JSONDecodeError is a ValueError
            # kombu #1551: a half-written message file on the filesystem
            # transport. The message is lost to us; asking again is safe.
            log.warning("%s: unreadable reply (%s), retrying (%d/%d)", what, exc, attempt, DECODE_RETRIES)
            last = exc
        except Exception as exc:
            raise BrokerError(f"{what} failed: {type(exc).__name__}: {exc}") from None
    raise BrokerError(f"{what}: replies kept arriving unreadable ({last}); see kombu issue #1551")


def inspect(app, conn, command: str, *, nodes: list[str] | None, expected: int, timeout: float) -> dict:
    """Run one inspect *command*; return ``{node: reply}``.

    Returns as soon as *expected* replies are in, or after *timeout* with
    what came. *nodes* restricts who answers; ``None`` asks everyone.
    """
    insp = app.control.inspect(
        destination=nodes or None, limit=expected or None, timeout=timeout, connection=conn
    )
    result = _retry_decode(f"inspect {command}", getattr(insp, command))
    return result or {}



def cancel_consumer(app, conn, queue: str, *, nodes: list[str] | None, valid_for: float = 60.0) -> None:
    """Tell *nodes* (every worker when ``None``) to stop consuming *queue*.

    A cast: no reply is awaited, so a worker that is busy right now (on the
    filesystem transport a worker with a backlog reads no control message
    until a pool process frees up) still gets it, in order, before any
    question sent after it. Cancelling a queue a worker does not consume is
    harmless.

    kombu stamps every control message with ``expires = now + timeout``
    (1 s by default). Celery's worker does not check it today, but this
    message is meant to be read late, so it is stamped *valid_for* seconds.
    """
    _retry_decode(
        f"cancel_consumer {queue}",
        lambda: app.control.cancel_consumer(queue, destination=nodes or None, reply=False, connection=conn,
                                            timeout=valid_for),
    )


def add_consumer(app, conn, queue: str, *, nodes: list[str], timeout: float) -> set[str]:
    """Tell *nodes* to consume *queue* again; the nodes that acknowledged within *timeout*.

    The undo of :func:`cancel_consumer`, for a worker a rolling restart
    drained but will not stop. The worker declares the queue from the app's
    configuration, or as a plain direct queue named after itself, as
    ``-Q`` does. Asking a worker that already consumes *queue* is harmless.
    """
    replies = _retry_decode(
        f"add_consumer {queue}",
        lambda: app.control.add_consumer(queue, destination=list(nodes), reply=True, limit=len(nodes),
                                         timeout=timeout, connection=conn),
    )
    return {name for reply in replies or () if isinstance(reply, dict) for name in reply}


def ping(app, conn, nodes: list[str], timeout: float) -> set[str]:
    """The *nodes* that answered a ping within *timeout* (returns once all have)."""
    replies = _retry_decode(
        "ping",
        lambda: app.control.ping(destination=list(nodes), limit=len(nodes), timeout=timeout, connection=conn),
    )
    return {name for reply in replies or () if isinstance(reply, dict) for name in reply}


class Remote:
    """One bounded broker connection for a sequence of control calls.

    What :mod:`celery_supervise.celery_side.drain` needs from Celery's remote control,
    behind a seam a test can replace with a scripted fake.
    """

    def __init__(self, app, connect_timeout: float = CONNECT_TIMEOUT):
        self.app = app
        self.conn = connect(app, connect_timeout)

    def cancel_consumer(self, queue: str, nodes: list[str] | None, valid_for: float) -> None:
        cancel_consumer(self.app, self.conn, queue, nodes=nodes, valid_for=valid_for)

    def inspect(self, command: str, nodes: list[str] | None, timeout: float) -> dict:
        """``{node: reply}``; returns as soon as every one of *nodes* replied.

        With ``nodes=None`` everyone may answer, so the call lasts until no
        reply came for *timeout* seconds.
        """
        return inspect(self.app, self.conn, command, nodes=nodes, expected=len(nodes or ()), timeout=timeout)

    def ping(self, nodes: list[str], timeout: float) -> set[str]:
        return ping(self.app, self.conn, nodes, timeout)

    def add_consumer(self, queue: str, nodes: list[str], timeout: float) -> set[str]:
        return add_consumer(self.app, self.conn, queue, nodes=nodes, timeout=timeout)

    def close(self) -> None:
        self.conn.release()

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def active_tasks(app, node: str, timeout: float) -> list:
    """The ``active`` reply of one worker *node*, within *timeout* seconds in all; BrokerError when it fails."""
    conn = connect(app, timeout=timeout)
    try:
        replies = inspect(app, conn, "active", nodes=[node], expected=1, timeout=timeout)
    finally:
        conn.release()
    return replies.get(node) or []
