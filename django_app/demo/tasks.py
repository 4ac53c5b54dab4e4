"""Demo tasks, among them one that leaves a family of processes behind.

``spawn_family`` is what celery-supervise is about: a task starts
subprocesses and does not wait for them.  Some stay attached to the worker
(they should die with it), some are detached on purpose with ``nohup`` or
``setsid`` (they should survive it).
"""

import json
import os
import signal
import subprocess
import sys
import time

from celery import shared_task

#: How long to wait for a started process to report in.
HANDSHAKE_TIMEOUT = 10.0

# A shell that starts a grandchild in the background, reports its PID
# atomically (write, then rename) and waits for it.
_GRANDPARENT_SCRIPT = 'sleep "$1" & echo $! > "$2.tmp" && mv "$2.tmp" "$2"; wait'


@shared_task
def add(x, y):
    return x + y


@shared_task
def sleep_task(seconds):
    time.sleep(seconds)
    return seconds


@shared_task(bind=True)
def spawn_family(self, marker_dir, hold=60, lifetime=120):
    """Start a family of subprocesses, write a marker file, then hold.

    Started, each living at most `lifetime` seconds so that none outlives a
    failed test for long::

        pool process
        ├── sleep                 plain        attached
        ├── sh                    plain_grandparent
        │   └── sleep             plain_grandchild
        ├── sleep (nohup)         nohup        ignores SIGHUP
        └── sh (own session)      setsid
            └── sleep             setsid_grandchild

    Then ``<marker_dir>/<task id>.json`` appears, atomically, with the PIDs,
    and the task sleeps `hold` seconds; once it has, ``<task id>.done``
    appears (so a soak can count it as finished without a result backend).
    It never waits for its children nor kills them.
    """
    task_id = self.request.id
    prefix = os.path.join(marker_dir, task_id)
    lifetime = str(lifetime)
    quiet = dict(
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=marker_dir,
    )

    # A task sent again (requeue) runs with the same id: a PID file of the
    # first run would be read as this run's grandchild.
    for stale in (prefix + ".plain_grandchild", prefix + ".setsid_grandchild"):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    plain = subprocess.Popen(["sleep", lifetime], **quiet)
    plain_grandparent = subprocess.Popen(
        ["sh", "-c", _GRANDPARENT_SCRIPT, "sh", lifetime, prefix + ".plain_grandchild"],
        **quiet,
    )
    # The real nohup binary: it sets SIGHUP to SIG_IGN, then execs sleep, so
    # the PID stays the same.  Its output is not a terminal, so it writes no
    # nohup.out.
    nohup = subprocess.Popen(["nohup", "sleep", lifetime], **quiet)
    # start_new_session=True is setsid() between fork and exec: the PID is
    # the one Popen returns.  (The setsid binary forks first whenever it is a
    # process group leader, which would hide the PID.)
    setsid = subprocess.Popen(
        ["sh", "-c", _GRANDPARENT_SCRIPT, "sh", lifetime, prefix + ".setsid_grandchild"],
        start_new_session=True,
        **quiet,
    )

    children = {
        "plain": plain.pid,
        "plain_grandparent": plain_grandparent.pid,
        "plain_grandchild": _read_pid_file(prefix + ".plain_grandchild", plain_grandparent),
        "nohup": nohup.pid,
        "setsid": setsid.pid,
        "setsid_grandchild": _read_pid_file(prefix + ".setsid_grandchild", setsid),
    }
    # Until nohup has exec'd sleep, SIGHUP is not ignored yet.
    _wait_for_exec(nohup, "sleep")
    marker = {
        "task_id": task_id,
        "pool_pid": os.getpid(),
        "pool_pgid": os.getpgrp(),
        "pool_sid": os.getsid(0),
        "children": children,
    }
    _write_atomically(prefix + ".json", json.dumps(marker))

    _hold_then_mark_done(prefix, hold)
    return marker


# A shell that starts three sleeps in the background, writes their PIDs
# (write, then rename) and exits at once without waiting: the sleeps are
# orphaned while the task still runs.  Backgrounded by a shell without job
# control, each stays in the worker's process group (the setsid'd one leaves
# it: `setsid` execs sleep in a session of its own, since a background job is
# no group leader).
_ORPHANING_SCRIPT = (
    'sleep "$1" & a=$!; nohup sleep "$1" >/dev/null 2>&1 & b=$!; setsid sleep "$1" & c=$!; '
    'echo "$a $b $c" > "$2.tmp" && mv "$2.tmp" "$2"'
)


@shared_task(bind=True)
def spawn_orphans(self, marker_dir, hold=60, lifetime=120):
    """Leave children that are orphaned while the task still runs, then hold.

    Started, each living at most `lifetime` seconds::

        pool process
        └── sh                    exits at once, so its children are re-parented
            ├── sleep             orphan          attached: still in the worker's group
            ├── sleep (nohup)     nohup_orphan    in the worker's group, ignores SIGHUP
            └── sleep (setsid)    setsid_orphan   a session (and group) of its own

    Then ``<marker_dir>/<task id>.json`` appears, as for :func:`spawn_family`,
    once the shell is gone and every sleep runs; the task holds `hold`
    seconds and writes ``<task id>.done``.
    """
    task_id = self.request.id
    prefix = os.path.join(marker_dir, task_id)
    pid_file = prefix + ".orphans"
    try:
        os.unlink(pid_file)  # a requeued run has the same id
    except FileNotFoundError:
        pass
    shell = subprocess.Popen(
        ["sh", "-c", _ORPHANING_SCRIPT, "sh", str(lifetime), pid_file],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=marker_dir,
    )
    if shell.wait(timeout=HANDSHAKE_TIMEOUT) != 0:
        raise RuntimeError(f"the orphaning shell exited with {shell.returncode}")
    with open(pid_file) as f:
        orphan, nohup_orphan, setsid_orphan = (int(pid) for pid in f.read().split())
    children = {"orphan": orphan, "nohup_orphan": nohup_orphan, "setsid_orphan": setsid_orphan}
    for pid in children.values():
        _wait_for_pid_exec(pid, "sleep")  # nohup and setsid exec sleep; until then SIGHUP is not ignored
    marker = {
        "task_id": task_id,
        "pool_pid": os.getpid(),
        "pool_pgid": os.getpgrp(),
        "pool_sid": os.getsid(0),
        "children": children,
    }
    _write_atomically(prefix + ".json", json.dumps(marker))

    _hold_then_mark_done(prefix, hold)
    return marker


def _wait_for_pid_exec(pid, program):
    """Wait until the process `pid` (not our child) runs `program`."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except FileNotFoundError:
            raise RuntimeError(f"PID {pid} exited before running {program}") from None
        if os.path.basename(argv0) == program.encode():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"PID {pid} did not exec {program} within {HANDSHAKE_TIMEOUT} s")
        time.sleep(0.01)


def _read_pid_file(path, parent):
    """Return the PID `parent` wrote to `path`, waiting for it with a deadline."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    while True:
        try:
            with open(path) as f:
                return int(f.read())
        except FileNotFoundError:
            pass
        if parent.poll() is not None:
            raise RuntimeError(f"{parent.args!r} exited with {parent.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{parent.args!r} wrote no {path} within {HANDSHAKE_TIMEOUT} s")
        time.sleep(0.01)


def _wait_for_exec(proc, program):
    """Wait until `proc` runs `program`, i.e. its wrapper has exec'd it."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    while True:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
        if os.path.basename(argv0) == program.encode():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before running {program}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} did not exec {program} within {HANDSHAKE_TIMEOUT} s")
        time.sleep(0.01)


def _write_atomically(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _hold_then_mark_done(prefix, hold):
    """Hold the pool process *hold* seconds, then write ``<prefix>.done`` (the tests' "finished" handshake)."""
    deadline = time.monotonic() + hold
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, 0.5))
    _write_atomically(prefix + ".done", json.dumps({"time": time.time(), "pool_pid": os.getpid()}))


@shared_task(bind=True)
def mark(self, marker_dir, hold=0.0, gate=None):
    """Write ``<task id>.started``, hold, write ``<task id>.done``.

    Each file is a JSON object: the wall-clock ``time`` it was written, the
    ``node`` that ran the task and its ``worker`` (the pool process's
    parent, the worker's main process). Every run also appends one line to
    ``<task id>.runs``, so a task run twice (delivered again, or sent again
    with the same id) shows two. A test counts which tasks ran, how often,
    where, and when one finished, without a result backend.

    It holds `hold` seconds, or, with a `gate` file, until that file is
    gone (at most `hold` seconds): a test removes the gate to let every
    later run of the same task finish at once.
    """
    return _mark(self, marker_dir, hold, gate)


@shared_task(bind=True, acks_late=True)
def mark_late(self, marker_dir, hold=0.0, gate=None):
    """:func:`mark`, acknowledged only once it has run (``acks_late``).

    A worker killed while it runs never acknowledges it, so the broker
    delivers it again by itself.
    """
    return _mark(self, marker_dir, hold, gate)


def _mark(task, marker_dir, hold, gate):
    prefix = os.path.join(marker_dir, task.request.id)
    where = {"node": task.request.hostname, "worker": os.getppid(), "pool": os.getpid()}
    started = json.dumps({"time": time.time(), **where})
    # One write(2) on an O_APPEND descriptor: a whole line, even if two runs race.
    fd = os.open(prefix + ".runs", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (started + "\n").encode())
    finally:
        os.close(fd)
    _write_atomically(prefix + ".started", started)
    deadline = time.monotonic() + hold
    while (remaining := deadline - time.monotonic()) > 0:
        if gate is not None and not os.path.exists(gate):
            break
        time.sleep(min(remaining, 0.05 if gate is not None else 0.5))
    _write_atomically(prefix + ".done", json.dumps({"time": time.time(), **where}))
    return task.request.id


_WITNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "witness.py")


@shared_task(bind=True)
def spawn_witnesses(self, marker_dir, hold=1.0, lifetime=120, stay=False):
    """Start attached children that write down each signal they get (``witness.py``), then hold.

    ``witness`` leaves on SIGTERM; with *stay*, ``stubborn`` too, which
    SIGTERM does not end. ``<marker_dir>/<task id>.json`` names them and
    their folders (``signals`` in each), ``<task id>.done`` appears once
    the task has held *hold* seconds, as for ``spawn_family``.
    """
    prefix = os.path.join(marker_dir, self.request.id)
    children, folders = {}, {}
    for role in ("witness", "stubborn") if stay else ("witness",):
        folder = f"{prefix}.{role}.{os.getpid()}"  # a re-run (requeue) gets folders of its own
        os.makedirs(folder, exist_ok=True)
        argv = [sys.executable, _WITNESS, folder, str(lifetime)] + (["--stay"] if role == "stubborn" else [])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=marker_dir)
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        while not os.path.exists(os.path.join(folder, "ready")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"witness {role} did not start (exit {proc.poll()})")
            time.sleep(0.01)
        children[role], folders[role] = proc.pid, folder
    marker = {"task_id": self.request.id, "pool_pid": os.getpid(), "children": children, "folders": folders}
    _write_atomically(prefix + ".json", json.dumps(marker))
    _hold_then_mark_done(prefix, hold)
    return marker


#: The ways a task's child leaves both the worker's tree and its process
#: group without a new session (see docs/escapes.md). Each starts, through
#: an intermediate that exits at once, three ``sleep LIFETIME.N``:
#: ``.1`` attached (own process group only), ``.2`` setsid'd, ``.3`` nohup'd.
ESCAPE_ROUTES = ("double_fork", "process_group", "job_control", "pool_child")
_ESCAPE_VARIANTS = {"attached": 1, "setsid": 2, "nohup": 3}

# Fork, fork again; the grandchild leaves the group (or the session) and runs sleep.
_DOUBLE_FORK = r"""
import os, signal, sys
for arg in sys.argv[1:]:
    variant, token = arg.split("=")
    if os.fork() == 0:
        if os.fork() == 0:
            if variant == "setsid":
                os.setsid()
            else:
                os.setpgid(0, 0)
            if variant == "nohup":
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            os.execvp("sleep", ["sleep", token])
        os._exit(0)
    os.wait()
"""

# Popen(process_group=0) (os.setpgid in preexec_fn before 3.11), then exit.
_PROCESS_GROUP = r"""
import os, signal, subprocess, sys
def group(ignore_hup):
    def prepare():
        if ignore_hup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if sys.version_info < (3, 11):
            os.setpgid(0, 0)
    return prepare
for arg in sys.argv[1:]:
    variant, token = arg.split("=")
    if variant == "setsid":
        subprocess.Popen(["sleep", token], start_new_session=True)
    elif sys.version_info >= (3, 11):
        subprocess.Popen(["sleep", token], process_group=0, preexec_fn=group(variant == "nohup"))
    else:
        subprocess.Popen(["sleep", token], preexec_fn=group(variant == "nohup"))
"""

# bash, not sh: dash ignores `set -m`. Each background job is a group of its own.
_JOB_CONTROL = 'set -m; sleep "$1" & setsid sleep "$2" & nohup sleep "$3" >/dev/null 2>&1 & exit 0'


@shared_task(bind=True)
def spawn_escapes(self, marker_dir, route, lifetime=120, hold=0.0):
    """Start three children that leave the tree and the process group by *route*.

    ``pool_child``: the pool process starts them itself (process_group=0,
    setsid, nohup+process_group) and they stay its children until the pool
    process is replaced (``--max-tasks-per-child=1``): run this on such a
    worker. The others go through an intermediate that exits at once.
    ``<marker_dir>/<task id>.json`` names the three PIDs, written once each
    runs sleep and (but for ``pool_child``) is no longer below the pool;
    ``<task id>.done`` appears once the task has held *hold* seconds.
    """
    if route not in ESCAPE_ROUTES:
        raise ValueError(f"unknown route {route!r}")
    # Unique per run (a pool process may run this more than once), so that each `sleep` is found by its command line.
    tokens = {v: f"{int(lifetime)}.{n}{os.getpid()}{time.monotonic_ns() % 10**6:06d}" for v, n in _ESCAPE_VARIANTS.items()}
    args = [f"{v}={t}" for v, t in tokens.items()]
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if route == "double_fork":
        subprocess.run([sys.executable, "-c", _DOUBLE_FORK, *args], check=True, timeout=HANDSHAKE_TIMEOUT, **quiet)
    elif route == "process_group":
        subprocess.run([sys.executable, "-c", _PROCESS_GROUP, *args], check=True, timeout=HANDSHAKE_TIMEOUT, **quiet)
    elif route == "job_control":
        subprocess.run(["bash", "-c", _JOB_CONTROL, "bash", *tokens.values()], check=True,
                       timeout=HANDSHAKE_TIMEOUT, **quiet)
    else:
        def nohup_group():
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            os.setpgid(0, 0)
        subprocess.Popen(["sleep", tokens["attached"]], preexec_fn=lambda: os.setpgid(0, 0), **quiet)
        subprocess.Popen(["sleep", tokens["setsid"]], start_new_session=True, **quiet)
        subprocess.Popen(["sleep", tokens["nohup"]], preexec_fn=nohup_group, **quiet)
    children = {v: _wait_for_sleep(t) for v, t in tokens.items()}
    marker = {"task_id": self.request.id, "route": route, "pool_pid": os.getpid(), "worker": os.getppid(),
              "children": children}
    prefix = os.path.join(marker_dir, self.request.id)
    _write_atomically(prefix + ".json", json.dumps(marker))
    _hold_then_mark_done(prefix, hold)
    return marker


def _wait_for_sleep(token):
    """The PID of the process running ``sleep <token>`` (exec'd, so its signal dispositions are final)."""
    want = b"sleep\0" + token.encode() + b"\0"
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read() == want:
                        return int(name)
            except OSError:
                continue
        time.sleep(0.02)
    raise TimeoutError(f"no `sleep {token}` within {HANDSHAKE_TIMEOUT} s")
