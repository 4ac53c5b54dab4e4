"""supervisord itself, as a deploy handles it: find it, check its config, start it, watch it go and come back.

Nothing here knows about Celery: the deploy (:mod:`celery_supervise.commands.deploy`)
strings these together around its savepid and kill.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from typing import Callable

from ..errors import SupervisorError
from ..processes import procs
from . import rpc

#: How often the waits for supervisord's exit (or answer) look.
POLL_INTERVAL = 0.1


def find_supervisord(which: Callable[[str], str | None] = shutil.which) -> str:
    """The ``supervisord`` beside this Python (the one its supervisor package installed), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "supervisord")
    if os.access(beside, os.X_OK):
        return beside
    found = which("supervisord")
    if found is None:
        raise SupervisorError("supervisord", "is neither beside this Python nor on PATH: it cannot be started again")
    return found


def check_config(conf: str) -> None:
    """Read *conf* as ``supervisord -c CONF`` will, before anything is stopped.

    A config supervisord would refuse (a missing log folder, a syntax error)
    or one that sets ``nodaemon=true`` (then ``supervisord -c`` never
    returns) would leave the host without workers after the shutdown.
    """
    from supervisor.options import ServerOptions

    options = ServerOptions()

    def usage(message):  # ServerOptions would print it and exit(2)
        raise SupervisorError(conf, f"supervisord would not start with it: {' '.join(str(message).split())}")

    options.usage = usage
    options.realize(args=["-c", conf], progname="supervisord")
    if options.nodaemon:
        raise SupervisorError(conf, "sets nodaemon=true, so `supervisord -c` would never return: set "
                              "nodaemon=false, or use --no-shutdown (restart the programs, not supervisord)")


def run_supervisord(executable: str, conf: str, timeout: float) -> None:
    """``supervisord -c CONF``, returning once it has daemonized (its first process exits 0).

    Its output goes to a temporary file, not a pipe: a supervisord that
    stayed in the foreground would otherwise die of a closed pipe.
    """
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen([executable, "-c", conf], stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT)
        except OSError as exc:
            raise SupervisorError(conf, f"cannot run {executable}: {exc.strerror or exc}") from None
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise SupervisorError(conf, f"`supervisord -c {conf}` has not returned after {timeout:g}s "
                                  "(does it stay in the foreground?)") from None
        if code != 0:
            output.seek(0)
            lines = output.read().decode(errors="replace").strip().splitlines()
            raise SupervisorError(conf, f"`supervisord -c {conf}` exited with {code}"
                                  + (f": {lines[-1]}" if lines else ""))


def running_supervisord(server: rpc.Server) -> procs.Proc | None:
    """The supervisord answering at *server*, as a local process; ``None`` if nobody answers there.

    Refused: a supervisord whose PID is no supervisord here (another PID
    namespace: its exit could not be watched, and its workers' PIDs mean
    something else here), and one that is PID 1 (its exit would end the
    container).
    """
    try:
        pid = int(server.proxy().supervisor.getPID())
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # no socket, nobody listening: not running
    except (OSError, xmlrpc.client.Error, http.client.HTTPException, ValueError) as exc:
        raise SupervisorError(server.url, f"did not answer getPID ({' '.join(str(exc).split())})") from None
    if pid == 1:
        raise SupervisorError(server.url, "is PID 1 here: its shutdown would end the container; "
                              "use --no-shutdown to restart its worker programs instead")
    proc = procs.read_proc(pid)
    if proc is None or not procs.runs_supervisord(proc.cmdline):
        raise SupervisorError(server.url, f"says it is PID {pid}, which is no supervisord on this host (another "
                              "PID namespace?): run deploy where supervisord runs, or use --no-shutdown")
    return proc


def wait_exit(sup: procs.Proc, timeout: float, *, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep,
              on_wait: Callable[[float], None] = lambda elapsed: None) -> bool:
    """Poll until supervisord *sup* has exited (a zombie has); ``False`` after *timeout* seconds."""
    started = clock()
    while True:
        current = procs.live_identity(sup.pid)  # None for a zombie: exited, not yet collected
        if current is None or not sup.same_process(current):
            return True
        elapsed = clock() - started
        if elapsed >= timeout:
            return False
        on_wait(elapsed)
        sleep(POLL_INTERVAL)


def wait_answer(server: rpc.Server, deadline: float, old_pid: int | None, *, late: str,
                clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """The PID of the new supervisord, once it answers at *server*; *late* is the error after *deadline*."""
    while True:
        try:
            pid = int(server.proxy().supervisor.getPID())
            if pid != old_pid:
                return pid
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            pass  # not listening yet
        if clock() >= deadline:
            raise SupervisorError(server.url, late)
        sleep(POLL_INTERVAL)
