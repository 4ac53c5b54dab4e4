"""Many real processes, cheaply: a crowd of strangers, or a worker-shaped tree.

The benchmarks need thousands of processes. They come from a *spawner*: this
file run as a script, in its own session, which builds one of two shapes and
then does nothing but reap::

    crowd N      spawner ─┬─ sleep        N direct children, strangers to
                          ├─ sleep        any worker (the "machine" others
                          └─ ...          share)

    worker N     spawner ── main (python)                    N processes in all
                            ├── pool (fork of main)          same cmdline as main
                            │   ├── sh -c 'sleep & sleep & sleep & wait'
                            │   │   ├── sleep  ├── sleep  └── sleep
                            │   ├── ...
                            │   └── sleep                    the remainder
                            └── pool (fork of main)
                                └── ...

The main leads its own process group, as under supervisord, and its pools are
forks of it, so ``snapshot.assign_roles`` calls them pools by command line.

The spawner is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever is
orphaned in the tree is re-parented to it and reaped at once, so a process
that was killed vanishes instead of lingering as a zombie. It exits on its
own once it has no child left (the tree was killed, or lived out its life).

Lifetimes are bounded twice: every process exits after ``lifetime`` seconds
by itself, and the spawner's ``alarm`` kills whatever is left a little later.
The parent side, :class:`Forest`, also kills by PID and reaps at ``close()``.
Every process carries :data:`MARK_ENV` in its environment, so a final sweep
can find leftovers by their environment, never by their name.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

#: Environment variable marking every process a benchmark run started.
MARK_ENV = "CELERY_SUPERVISE_BENCH_RUN"

#: How long a spawned process lives unless killed.
DEFAULT_LIFETIME = 120

#: How long to wait for a spawner to report, or for its tree to be complete.
HANDSHAKE_TIMEOUT = 60.0

CROWD = "crowd"
WORKER = "worker"
TASK_SCRIPT = "sleep {0} & sleep {0} & sleep {0} & wait"  # one sh and three sleeps
TASK_SIZE = 4

PR_SET_CHILD_SUBREAPER = 36
SLEEP = "/bin/sleep" if os.path.exists("/bin/sleep") else "/usr/bin/sleep"
SH = "/bin/sh"


# ---------------------------------------------------------------- both sides


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) descendants of *pid*, from ``/proc/PID/task/*/children``."""
    out, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if is_gone(kid):
                    continue
                out.append(kid)
                stack.append(kid)
    return out


def is_gone(pid: int) -> bool:
    """True when *pid* does not exist or is a zombie (it has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # The state follows the last ')' (the command name may contain one).
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


# -------------------------------------------------------------- spawner side


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def _spawn(argv: list[str]) -> int:
    # posix_spawn (vfork + exec) costs far less than a Python fork per process.
    return os.posix_spawn(argv[0], argv, os.environ, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


def _forked(body) -> int:
    """Fork a child that runs *body* and always ends with ``os._exit``."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _default_signals()
            body()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _pool(share: int, lifetime: float) -> None:
    for _ in range(share // TASK_SIZE):
        _spawn([SH, "-c", TASK_SCRIPT.format(int(lifetime))])
    for _ in range(share % TASK_SIZE):
        _spawn([SLEEP, str(int(lifetime))])
    time.sleep(lifetime)


def _main(count: int, lifetime: float) -> None:
    os.setpgid(0, 0)  # a group leader, as supervisord makes every program
    rest = count - 3
    for share in (rest - rest // 2, rest // 2):
        _forked(lambda share=share: _pool(share, lifetime))
    time.sleep(lifetime)


def _reap(block: bool) -> bool:
    """Reap children; return False once there are none left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _kill_all_descendants() -> None:
    """SIGKILL every descendant by PID until none is left, reaping as we go."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = descendants(os.getpid())
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(block=False)
        time.sleep(0.01)
    _reap(block=True)


def spawner_main(argv: list[str]) -> int:
    shape, count, lifetime = argv[0], int(argv[1]), float(argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # even under nohup, tasks are "attached"
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(int(lifetime) + 10)
    try:
        if shape == CROWD:
            pids = [_spawn([SLEEP, str(int(lifetime))]) for _ in range(count)]
            report = {"pids": pids}
        elif shape == WORKER:
            if count < 3:
                raise SystemExit("a worker tree needs at least 3 processes (main and 2 pools)")
            report = {"root": _forked(lambda: _main(count, lifetime))}
        else:
            raise SystemExit(f"unknown shape {shape!r}")
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
        _reap(block=True)  # returns when the last child is gone
    except _Stop:
        _kill_all_descendants()
    return 0


# --------------------------------------------------------------- parent side


class SpawnError(RuntimeError):
    pass


class Forest:
    """A spawner and its processes, for ``with`` blocks.

    ``Forest(WORKER, 1000)`` returns once all 1000 processes exist;
    ``.root`` is the main's PID. ``Forest(CROWD, 3000)`` has ``.pids``.
    """

    def __init__(self, shape: str, count: int, *, run_id: str, lifetime: float = DEFAULT_LIFETIME):
        self.shape, self.count, self.lifetime = shape, count, lifetime
        self.root: int | None = None
        self.pids: list[int] = []
        env = dict(os.environ, **{MARK_ENV: run_id})
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), shape, str(count), str(lifetime)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # no terminal signal reaches the tree
        )
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> SpawnError:
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace").strip()
        return SpawnError(f"spawner {self.shape} {self.count}: {what}; exit code {self.proc.poll()}; stderr: {err!r}")

    def _handshake(self) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no report within {HANDSHAKE_TIMEOUT} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self._fail("exited before reporting")
                buf += chunk
        report = json.loads(buf.split(b"\n", 1)[0])
        if self.shape == CROWD:
            self.pids = report["pids"]
            return
        self.root = report["root"]
        while True:  # the pools and shells fork on their own: wait for the count
            self.pids = [self.root, *descendants(self.root)]
            if len(self.pids) >= self.count:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise self._fail(f"tree has {len(self.pids)} of {self.count} processes")
            time.sleep(0.05)

    def wait_empty(self, timeout: float = 10.0) -> bool:
        """Wait for the spawner to exit by itself (its whole tree is gone)."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        """Kill the spawner and, by PID, anything of its tree left; reap the spawner."""
        import psutil

        if self.proc.poll() is None:
            try:
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            self.proc.terminate()  # its handler SIGKILLs every descendant, then reaps
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            # Belt and braces: psutil's kill() checks the creation time, so a
            # PID reused since we listed it is never signalled.
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> "Forest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(spawner_main(sys.argv[1:]))
