"""Real processes for tests: waiting, marking, starting and reaping them.

Every process the suite starts carries ``CELERY_SUPERVISE_TEST_RUN=<run id>``
in its environment.  conftest puts it into pytest's own environment, so
subprocesses, supervisord, the Celery worker and every task's children
inherit it.  A leaked process is then found by its environment, never by its
name, and only processes of this very run are ever signalled.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from celery_supervise.processes import procs

#: Environment variable that marks the processes of one pytest run.
RUN_ENV_VAR = "CELERY_SUPERVISE_TEST_RUN"

#: How long a helper process lives unless killed: longer than any test.
DEFAULT_LIFETIME = 150

#: How long to wait for a started process to report its PIDs.
HANDSHAKE_TIMEOUT = 10.0


class WaitTimeout(AssertionError):
    """A :func:`wait_for` deadline passed: what was awaited never happened."""


def wait_for(predicate, timeout, what, interval=0.02):
    """Call `predicate` until it returns something truthy, and return that.

    Raises :class:`WaitTimeout` naming `what` once `timeout` seconds have
    passed on the monotonic clock.  `predicate` may raise to give up early.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def marked_processes(run_id, exclude=()):
    """Return the live processes whose environment carries `run_id`.

    Zombies are left out: they are dead already, and their environment can
    no longer be read.  /proc/PID/environ shows the environment a process
    was started with, so pytest itself, which gets the marker later, is not
    found.  A process started during the very scan can be missed (seen once,
    with a shell that forked in the background as the test ended); the
    session-end reap finds it later.
    """
    found = []
    for proc in psutil.process_iter():
        if proc.pid in exclude:
            continue
        try:
            if proc.environ().get(RUN_ENV_VAR) == run_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            # another user's process: not one of ours
            continue
    return found


def describe(procs):
    """One line per process: PID (and its PID inside a PID namespace of its own), parent, group, command line."""
    lines = []
    for proc in procs:
        try:
            with proc.oneshot():
                pgid = os.getpgid(proc.pid)
                cmdline = shlex.join(proc.cmdline()) or proc.name()
                inner = _inner_pid(proc.pid)
                where = "" if inner is None else f" (PID {inner} in its own PID namespace)"
                lines.append(f"  pid={proc.pid}{where} ppid={proc.ppid()} pgid={pgid} {cmdline}")
        except (psutil.Error, ProcessLookupError, OSError):
            lines.append(f"  pid={proc.pid} (gone)")
    return "\n".join(lines)


def _inner_pid(pid):
    """*pid*'s PID in the innermost PID namespace it is in, if that is not ours (a test's container)."""
    theirs, ours = _nspid(pid), _nspid(os.getpid())
    return theirs[-1] if len(theirs) > len(ours) else None


def _nspid(pid):
    with open(f"/proc/{pid}/status") as f:
        return next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])


def reap(procs, timeout=5.0):
    """Send SIGTERM to `procs`, wait, then SIGKILL whatever is left.

    psutil checks each process's identity (PID plus creation time) before
    signalling, so a PID reused since `procs` were looked up is spared.
    Returns the processes still alive at the end, which should be none.
    """
    procs = list(procs)
    running = [p for p in procs if not is_gone(p)]
    for proc in running:
        _signal(proc, signal.SIGTERM)
    alive = wait_gone(running, timeout)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    alive = wait_gone(alive, timeout)
    for proc in procs:
        _collect_child(proc)
    return alive


def wait_gone(procs, timeout):
    """Wait until every one of `procs` is gone; return those that are not.

    Not psutil.wait_procs: it waits for a zombie to be reaped, and the init
    process of some machines (this one's) reaps orphans only every second
    or two.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if not is_gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


def _collect_child(proc):
    """Reap `proc` if it is a zombie child of pytest, so none piles up."""
    try:
        if proc.ppid() == os.getpid():
            proc.wait(timeout=1)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
        pass


def reap_leaks(run_id, exclude=()):
    """Kill every live process marked with `run_id`; describe what was killed.

    Processes inside a test's PID namespace (``tests/realcontainer.py``) are
    found and signalled by their PIDs here, like any other; the namespace's
    PID 1 is one of them, and once it dies the kernel kills the rest.

    Returns ``None`` when there was nothing to kill, else a message listing
    the processes (and any that would not die).
    """
    leaked = marked_processes(run_id, exclude=exclude)
    if not leaked:
        return None
    message = f"{len(leaked)} process(es) left alive, now killed:\n{describe(leaked)}"
    still_alive = reap(leaked)
    if still_alive:
        message += f"\ncould not kill:\n{describe(still_alive)}"
    return message


def is_gone(proc):
    """Whether `proc` has exited (a zombie has: it only awaits its reaper)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _signal(proc, sig):
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass  # exited on its own meanwhile


def sighup_ignored(pid):
    """Whether process `pid` ignores SIGHUP, read from /proc/PID/status."""
    return bool(ignored_signals(pid) & (1 << (signal.SIGHUP - 1)))


def ignored_signals(pid):
    """The SigIgn mask of process `pid` as an int (bit n-1 is signal n)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return int(line.split()[1], 16)
    raise ValueError(f"no SigIgn in /proc/{pid}/status")


@dataclass(frozen=True)
class Chain:
    """A started child and the grandchild it started."""

    child: psutil.Process
    grandchild: psutil.Process


# A shell that starts a grandchild in the background, reports its PID
# atomically (write, then rename) and waits for it.
_CHAIN_SCRIPT = 'sleep "$1" & echo $! > "$2.tmp" && mv "$2.tmp" "$2"; wait'


class RealProcs:
    """Starts bounded-lifetime test processes and reaps them afterwards.

    Every process started here, or handed to :meth:`track`, is killed by
    :meth:`reap`, children before their parents.
    """

    def __init__(self, workdir, lifetime=DEFAULT_LIFETIME):
        self.workdir = workdir
        self.lifetime = lifetime
        self.tracked = []
        self._count = 0

    def spawn(self, argv, **popen_kwargs):
        """Start `argv` as a :class:`psutil.Popen` and track it.

        ``process_group=PGID`` works on Python 3.10 too, where Popen does
        not take it yet: the child joins the group itself before it execs.
        """
        if sys.version_info < (3, 11) and "process_group" in popen_kwargs:
            pgid = popen_kwargs.pop("process_group")
            popen_kwargs["preexec_fn"] = lambda: os.setpgid(0, pgid)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
        popen_kwargs.setdefault("cwd", self.workdir)
        proc = psutil.Popen(argv, **popen_kwargs)
        self.tracked.append(proc)
        return proc

    def spawn_chain(self, *, nohup=False, setsid=False, lifetime=None):
        """Start ``sh`` → ``sleep`` and return both once the PIDs are known.

        With `nohup`, ``sh`` runs under the real nohup binary (which execs
        it, keeping the PID) and both ignore SIGHUP.  With `setsid`, ``sh``
        leads a new session, and the grandchild is in it.
        """
        self._count += 1
        pid_file = os.path.join(self.workdir, f"chain{self._count}.pid")
        stderr_file = os.path.join(self.workdir, f"chain{self._count}.stderr")
        argv = ["sh", "-c", _CHAIN_SCRIPT, "sh", str(lifetime or self.lifetime), pid_file]
        if nohup:
            argv = ["nohup", *argv]
        with open(stderr_file, "wb") as stderr:
            child = self.spawn(argv, stderr=stderr, start_new_session=setsid)

        def grandchild_pid():
            if child.poll() is not None:
                with open(stderr_file, errors="replace") as f:
                    raise AssertionError(
                        f"{shlex.join(argv)} exited with {child.returncode} before "
                        f"writing {pid_file}; stderr:\n{f.read()}"
                    )
            try:
                with open(pid_file) as f:
                    return int(f.read())
            except FileNotFoundError:
                return None

        grandchild = self.track(wait_for(grandchild_pid, HANDSHAKE_TIMEOUT, f"{pid_file} from {argv[0]}"))[0]
        if nohup:
            # nohup ignores SIGHUP, then execs sh: wait until it has.
            wait_for(lambda: child.name() == "sh", HANDSHAKE_TIMEOUT, "nohup to exec sh")
        return Chain(child=child, grandchild=grandchild)

    def spawn_on_pid(self, pid, created, lifetime=None):
        """Start a ``sleep`` that the kernel gives the PID *pid* again; return it.

        *pid* belonged to a process created at *created* (epoch seconds)
        that has exited. Creation times have clock-tick (10 ms) resolution
        and a real PID reuse needs the PID space to wrap, which takes far
        longer than a tick: wait, on the clock creation times count (ticks
        since boot), until a tick has passed, then point
        ``/proc/sys/kernel/ns_last_pid`` (root only) just below *pid*.
        Another process may grab the PID first: try again, 20 times.
        """
        wait_for(lambda: procs.read_btime() + time.clock_gettime(time.CLOCK_BOOTTIME) > created + 0.03,
                 5, "a later clock tick")
        for _ in range(20):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
            candidate = self.spawn(["sleep", str(lifetime or self.lifetime)], process_group=0)
            if candidate.pid == pid:
                return candidate
        raise AssertionError("could not make the kernel reuse the PID")

    def track(self, *procs):
        """Register processes started elsewhere, by PID or psutil.Process.

        Look PIDs up right away, so that their identity is pinned before
        they could exit and their PIDs be reused.  Returns the processes
        (PIDs already gone are skipped).
        """
        found = []
        for proc in procs:
            if not isinstance(proc, psutil.Process):
                try:
                    proc = psutil.Process(proc)
                except psutil.NoSuchProcess:
                    continue
            found.append(proc)
        self.tracked.extend(found)
        return found

    def reap(self, timeout=5.0):
        """Kill everything tracked, the youngest first; return the survivors."""
        procs = sorted(self.tracked, key=_create_time, reverse=True)
        self.tracked = []
        return reap(procs, timeout=timeout)


def _create_time(proc):
    try:
        return proc.create_time()
    except psutil.NoSuchProcess:
        return 0.0
