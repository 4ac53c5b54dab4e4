"""supervisord's eventlistener protocol: the few lines around :mod:`supervisor.childutils`.

stdout carries only the protocol (``READY``, then ``RESULT 2\\nOK`` per
event); an event is a header line whose ``len`` says how many bytes of
payload follow.
"""

from __future__ import annotations

import os
import signal
from typing import TextIO

import psutil
from supervisor import childutils

from ..errors import UsageError
from ..processes import procs
from ..processes.procs import Identity

#: Larger than any event we subscribe to (supervisord's own payloads are a
#: line or two); a header announcing more is malformed.
MAX_PAYLOAD = 1 << 24


def ready(stdout: TextIO) -> None:
    childutils.listener.ready(stdout)


def ok(stdout: TextIO) -> None:
    childutils.listener.ok(stdout)


def text(data: bytes | str) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def parse_header(line: str) -> tuple[dict, int]:
    """The header's tokens and its payload length; ValueError for a length we must not read."""
    headers = childutils.get_headers(line)
    length = headers.get("len", "0")
    # Only plain digits: int() also takes "-1" (read(-1) would swallow every
    # later event until supervisord exits), "٣" and " 5"; and a bound, since a
    # huge len blocks until that much arrives, or overflows read() itself.
    if not (length.isascii() and length.isdigit()) or int(length) > MAX_PAYLOAD:
        raise ValueError(f"malformed header: len {length[:40]!r} is not a payload length")
    return headers, int(length)


def parse_payload(payload: str) -> dict:
    """``key:value`` tokens of a PROCESS_STATE/TICK payload (body ignored)."""
    line = payload.split("\n", 1)[0]
    try:
        return childutils.get_headers(line)
    except ValueError:
        raise ValueError(f"malformed payload {line[:200]!r}") from None


def program_name(fields: dict) -> str:
    """``group:name`` of a PROCESS_STATE payload, or ``name`` alone for a program's own group."""
    if fields["groupname"] == fields["processname"]:
        return fields["processname"]
    return f"{fields['groupname']}:{fields['processname']}"


class Stop(BaseException):
    """Raised from the SIGTERM handler to leave a blocking wait.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way (Celery's, kombu's, our own edges') can swallow it.
    """


class Loop:
    """The eventlistener's loop: ``READY``, wait, read one event, handle it, ``OK``; SIGTERM ends it.

    A subclass provides ``start()`` (before the first event),
    ``wait_for_input()`` (block until stdin is readable; it may use
    :meth:`_blocking`), ``handle_event(headers, payload)`` (never raises for
    a bad event), ``finish()`` (on our own SIGTERM), ``close()`` and
    ``log(action, **fields)``, and sets ``stdout``, ``_input`` (stdin,
    as bytes when it can), ``stop_requested`` and ``_waiting``.
    """

    def _blocking(self, call, *args):
        """Run a blocking read or wait that our SIGTERM may interrupt."""
        if self.stop_requested:
            raise Stop()
        self._waiting = True
        try:
            return call(*args)
        finally:
            self._waiting = False

    def read_event(self) -> tuple[dict, str] | None:
        """childutils' wait(), except that end of input returns ``None``."""
        ready(self.stdout)
        self.wait_for_input()
        line = text(self._blocking(self._input.readline))
        if not line:
            return None
        headers, length = parse_header(line)
        return headers, text(self._input.read(length))

    def _on_term(self, signum, frame) -> None:
        self.stop_requested = True
        if self._waiting:
            # Only a blocking wait is interrupted; an event being handled (a
            # reap in its grace period) is finished first.
            self._waiting = False
            raise Stop()

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
            try:
                self.start()
                while True:
                    try:
                        event = self.read_event()
                    except ValueError as exc:
                        # A broken header line: we cannot know its length, so we
                        # cannot resynchronise; acknowledging keeps supervisord going.
                        self.log("malformed", error=str(exc))
                        ok(self.stdout)
                        continue
                    if event is None:
                        self.log("exit", why="end of input (supervisord gone); workers left for the next sweep")
                        return 0
                    self.handle_event(*event)
                    ok(self.stdout)
                    if self.stop_requested:
                        raise Stop()
            except BrokenPipeError:
                self.log("exit", why="supervisord closed our stdout; workers left for the next sweep")
                return 0
            except Stop:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                self.log("stopping", why="SIGTERM")
                self.finish()
                return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.close()


def from_environment(environ: dict) -> tuple[Identity, object]:
    """Our supervisord's identity and RPC proxy; :class:`UsageError` (exit 2) outside one.

    ``SUPERVISOR_SERVER_URL`` is the proxy's URL (for error messages).
    """
    if "SUPERVISOR_SERVER_URL" not in environ or "SUPERVISOR_PROCESS_NAME" not in environ:
        raise UsageError("the listener must run under supervisord as an [eventlistener:x] section")
    ppid = os.getppid()
    ident = Identity.of(ppid)
    try:
        cmd = psutil.Process(ppid).cmdline()
    except psutil.Error:
        cmd = []
    if ident is None or not procs.runs_supervisord(cmd):
        raise UsageError("the listener's parent is not supervisord; run it as an [eventlistener:x] section")
    return ident, childutils.getRPCInterface(environ)
