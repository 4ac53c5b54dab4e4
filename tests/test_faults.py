"""Faults, with real processes and no broker or supervisord (fast).

Each test makes one thing go wrong for real (the clock is set, the tool is
SIGKILLed mid-kill, a process ignores SIGTERM or is a zombie, a PID is
recycled, the state folder is read-only or full) and checks what the
README's "Faults and what happens" says: the exit code, one line on stderr,
what was and was not signalled, and that a rerun finishes the job.

The faults that need a broker or supervisord are in test_e2e_faults.py.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from celery_supervise.processes import plan, procs, snapshot, statefile
from celery_supervise.processes.plan import Policy

from realprocs import wait_for
from realsupervisor import REPO
from test_kill import LIFETIME, alive, cli, fake_worker, pids, write_state  # noqa: F401  (fixture)

sys.path.insert(0, str(REPO))
from bench.clocklock import ClockLock  # noqa: E402  (the soaks' lock: see clock_jump)

PRIMED = os.path.join(os.path.dirname(__file__), "programs", "primed.py")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (clock, mounts, ns_last_pid)")


# ----------------------------------------------------------------- the clock


@contextlib.contextmanager
def clock_set_by(seconds):
    """Set the realtime clock *seconds* ahead (or back); always set it right again.

    Right again means where it would be had it never been touched: the time
    it showed before, plus what CLOCK_MONOTONIC (which setting the realtime
    clock does not move) says has passed since. Other test runs share this
    clock, so callers keep the ``with`` body to the one action under test.
    """
    mono = time.clock_gettime(time.CLOCK_MONOTONIC)
    real = time.clock_gettime(time.CLOCK_REALTIME)
    time.clock_settime(time.CLOCK_REALTIME, real + seconds)
    try:
        yield
    finally:
        time.clock_settime(time.CLOCK_REALTIME, real + (time.clock_gettime(time.CLOCK_MONOTONIC) - mono))


@pytest.fixture
def clock_jump():
    """``clock_jump(seconds)``: a context manager that sets the clock for its body only.

    The step is made holding the soaks' clock lock exclusive
    (bench/clocklock.py), as the chaos soak's own ``clock-stepped`` fault
    does: a soak running on this machine beside the tests is then between
    two cycles, with nothing timed by the wall clock. Unlocked, one of these
    tests once made a soak's supervisord SIGKILL its worker mid-stop.
    """
    @contextlib.contextmanager
    def jump(seconds):
        lock = ClockLock()  # the default path, which every soak takes unless told otherwise
        try:
            with lock.exclusive(), clock_set_by(seconds):
                yield
        finally:
            lock.close()

    return jump


class Primed:
    """``primed.py``: a celery-supervise action, imported and waiting for go."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, PRIMED, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the handshake: blocks until imported
        if line != "ready\n":
            out, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"primed.py {args} did not get ready ({line!r}): {err}")

    def go(self, timeout=30) -> subprocess.CompletedProcess:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        out, err = self.proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


@pytest.mark.clockjump
@needs_root
@pytest.mark.parametrize("seconds", [30, -30], ids=["ahead", "back"])
def test_kill_after_the_clock_was_set(fake_worker, tmp_path, clock_jump, seconds):
    """savepid, the clock is set, kill: every identity still matches, the tree dies, detached ones live.

    /proc/stat's btime is the realtime clock minus the uptime, so setting
    the clock moves every creation time computed from it. Before the state
    file carried the boot id, the kill refused the whole record as "written
    before the last boot" and the tree leaked.
    """
    state = write_state(tmp_path / "state.json", snapshot.read_worker(fake_worker["main"]))
    kill = Primed("cli", "kill", state, "--grace", "5", "--json")
    before = procs.read_btime()
    with clock_jump(seconds):
        moved = procs.read_btime() - before
        res = kill.go()
    assert abs(moved - seconds) <= 1, "setting the clock did not move btime; the test proves nothing"
    assert res.returncode == 0, res.stderr
    statuses = {}
    for p in json.loads(res.stdout)["processes"]:
        statuses.setdefault(p["status"], set()).add(p["pid"])
    attached = {fake_worker["main"]} | pids(fake_worker, "pool", "plain", "parent", "grandchild")
    assert statuses == {"killed": attached, "spared": pids(fake_worker, "nohup", "setsid")}
    assert not any(alive(p) for p in attached)
    assert all(alive(p) for p in pids(fake_worker, "nohup", "setsid"))


@pytest.mark.clockjump
@needs_root
def test_listener_started_after_the_clock_was_set_keeps_its_supervisords_workers(real_procs, tmp_path, clock_jump):
    """A listener record's supervisord identity is rebased too.

    A listener (re)started after the clock was set reads the records the
    previous one wrote. Compared raw, the recorded supervisord no longer
    matches the live one, the worker looks orphaned, and the sweep would
    warm-stop a healthy worker of a live supervisord.
    """
    sup = real_procs.spawn(["sleep", str(LIFETIME)])  # stands in for supervisord: only its identity is read
    main = real_procs.spawn(["sleep", str(LIFETIME)], process_group=0)
    worker = snapshot.read_worker(main.pid, program="w", supervisor_pid=sup.pid)
    doc = statefile.to_document(snapshot.take([worker], "listener"), Policy(), plan.plan([worker], Policy()))
    doc["supervisor"] = {"pid": sup.pid, "create_time": procs.live_identity(sup.pid)}
    state_dir = tmp_path / "records"
    state_dir.mkdir(mode=0o700)
    statefile.write(str(state_dir / f"w@{main.pid}.json"), doc)
    sweep = Primed("sweep", str(state_dir), str(sup.pid))
    with clock_jump(45):
        res = sweep.go()
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", "the sweep logged an action: " + res.stderr
    assert main.is_running() and main.status() != psutil.STATUS_ZOMBIE
    assert os.path.exists(state_dir / f"w@{main.pid}.json")


# ------------------------------------------------- a fake worker for savepid

# The CLI's whole path (savepid, then kill) needs a process savepid takes for
# a Celery worker of -A faultapp: a Python script named ``celery`` run as
# ``python …/celery -A faultapp worker``, as a virtualenv's console script
# runs. Its app talks to a private filesystem broker, which nobody answers:
# savepid records the tree by the process scan and says so.
FAULTAPP = '''
from celery import Celery
from celery_supervise.celery_side.fs_transport import TRANSPORT_PATH, filesystem_broker_options

app = Celery("faultapp", broker="filesystem://")
app.conf.broker_transport = TRANSPORT_PATH
app.conf.broker_transport_options = filesystem_broker_options({broker!r})
'''
FAKE_CELERY = "import time\ntime.sleep({lifetime})\n"


@pytest.fixture
def project(tmp_path):
    """A folder with ``faultapp.py`` and a fake ``celery`` script; the CLI runs from it."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "faultapp.py").write_text(FAULTAPP.format(broker=str(tmp_path / "broker")))
    (folder / "celery").write_text(FAKE_CELERY.format(lifetime=LIFETIME))
    return folder


def start_fake_celery(real_procs, project):
    proc = real_procs.spawn([sys.executable, str(project / "celery"), "-A", "faultapp", "worker"],
                            cwd=str(project), process_group=0)
    wait_for(lambda: "worker" in proc.cmdline(), 10, "the fake worker to exec")
    return proc


def run(project, *args, timeout=60):
    """``celery-supervise ARGS`` from the project folder."""
    return subprocess.run([sys.executable, "-m", "celery_supervise", *args], cwd=str(project),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def savepid(project, path):
    return run(project, "-A", "faultapp", "savepid", str(path), "--reply-timeout", "0.2", "--json")


def one_error_line(res, *fragments):
    lines = res.stderr.splitlines()
    errors = [line for line in lines if line.startswith("celery-supervise: error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- PID wrap


@needs_root
def test_pid_recycled_between_savepid_and_kill_is_refused_and_named(real_procs, project, tmp_path):
    """savepid -> the worker exits -> its PID goes to a stranger -> kill: refused, named, exit 0.

    Exit 0 because nothing that was recorded is left to kill: the recorded
    process is gone, and the stranger is not ours.
    """
    victim = start_fake_celery(real_procs, project)
    state = tmp_path / "state.json"
    saved = savepid(project, state)
    assert saved.returncode == 0, saved.stderr
    assert [w["main"] for w in json.loads(saved.stdout)["workers"]] == [victim.pid]
    created = victim.create_time()
    victim.kill()
    victim.wait(10)
    stranger = real_procs.spawn_on_pid(victim.pid, created, LIFETIME)

    res = run(project, "kill", str(state), "--grace", "1")
    assert res.returncode == 0, res.stderr
    line = next(line for line in res.stdout.splitlines() if f" {victim.pid} " in f" {line} ")
    assert "refused" in line and "PID now held by another process" in line
    assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE


# ------------------------------------------------- TERM ignored, zombies


def start_stubborn(real_procs, tmp_path, name="stubborn", **popen):
    log = tmp_path / f"{name}.log"
    proc = real_procs.spawn([sys.executable, os.path.join(os.path.dirname(__file__), "programs", "stubborn.py"),
                             str(log), str(LIFETIME)], **popen)
    wait_for(lambda: log.exists() and "ready" in log.read_text(), 10, f"{name} to install its handler")
    return proc, log


def test_a_process_that_ignores_sigterm_is_sigkilled_after_the_grace(real_procs, tmp_path):
    proc, log = start_stubborn(real_procs, tmp_path, process_group=0)
    state = write_state(tmp_path / "state.json", snapshot.read_worker(proc.pid))
    res = cli("kill", state, "--grace", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(res.stdout)["processes"]
    assert (entry["status"], entry["signal"]) == ("killed", "SIGKILL")
    assert "TERM" in log.read_text()  # it did get the SIGTERM first, and survived it
    assert "waiting for 1 process(es) to exit after SIGTERM" in res.stderr
    assert not alive(proc.pid)


ZOMBIE_PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", sys.argv[2]])
open(sys.argv[1] + ".tmp", "w").write(str(child.pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(float(sys.argv[2]))  # never waits for the child: once it dies, it stays a zombie
"""


def test_a_recorded_process_that_is_now_a_zombie_is_gone_and_its_parent_killed(real_procs, tmp_path):
    """A zombie has exited: it is reported gone, never signalled; its parent is killed as usual."""
    pid_file = tmp_path / "child.pid"
    parent = real_procs.spawn([sys.executable, "-c", ZOMBIE_PARENT, str(pid_file), str(LIFETIME)], process_group=0)
    child = real_procs.track(wait_for(lambda: pid_file.exists() and int(pid_file.read_text()), 10, "the child"))[0]
    state = write_state(tmp_path / "state.json", snapshot.read_worker(parent.pid))
    child.kill()
    wait_for(lambda: child.status() == psutil.STATUS_ZOMBIE, 10, "the child to be a zombie")
    res = cli("kill", state, "--grace", "2", "--json")
    assert res.returncode == 0, res.stderr
    doc = {p["pid"]: p for p in json.loads(res.stdout)["processes"]}
    assert (doc[child.pid]["status"], doc[child.pid]["reason"]) == ("gone", "already gone")
    assert (doc[parent.pid]["status"], doc[parent.pid]["signal"]) == ("killed", "SIGTERM")


def test_a_recorded_main_that_is_a_zombie_of_our_ancestor_is_gone(real_procs, tmp_path):
    """The zombie's parent is pytest, an ancestor of the tool: it is neither signalled nor waited on."""
    proc = real_procs.spawn(["sleep", str(LIFETIME)], process_group=0)
    state = write_state(tmp_path / "state.json", snapshot.read_worker(proc.pid))
    proc.kill()
    wait_for(lambda: proc.status() == psutil.STATUS_ZOMBIE, 10, "a zombie")  # pytest does not wait() yet
    res = cli("kill", state, "--grace", "2", "--json")
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(res.stdout)["processes"]
    assert (entry["status"], entry["reason"]) == ("gone", "already gone")
    assert proc.status() == psutil.STATUS_ZOMBIE  # still there for its parent to reap


# ------------------------------------------------------ SIGKILL mid-kill


def test_the_tool_sigkilled_during_its_grace_wait_then_rerun(fake_worker, real_procs, tmp_path):
    """kill is SIGKILLed in its TERM grace wait; a rerun finishes, harming nothing.

    The stubborn process, born into the worker's process group (an orphan
    the kill finds by the group scan), logs the SIGTERM and survives it, so
    the first kill is certainly in its grace wait when it is SIGKILLed.
    """
    import fcntl

    state = write_state(tmp_path / "state.json", snapshot.read_worker(fake_worker["main"]))
    stubborn, log = start_stubborn(real_procs, tmp_path, process_group=fake_worker["main"])
    lock = str(tmp_path / "reaper.lock")
    env = {**os.environ, "CELERY_SUPERVISE_LOCK": lock}
    first = subprocess.Popen([sys.executable, "-m", "celery_supervise", "kill", state, "--grace", "60"],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: "TERM" in log.read_text() or first.poll() is not None, 30, "the SIGTERM to reach stubborn")
        assert first.poll() is None, first.communicate()
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -9
    attached = {fake_worker["main"]} | pids(fake_worker, "pool", "plain", "parent", "grandchild")
    wait_for(lambda: not any(alive(p) for p in attached), 10, "the TERMed tree to exit")

    # The kernel dropped the dead tool's flock with its descriptors.
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    res = subprocess.run([sys.executable, "-m", "celery_supervise", "kill", state, "--grace", "0.5", "--json"],
                         env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    statuses = {}
    for p in json.loads(res.stdout)["processes"]:
        statuses.setdefault(p["status"], set()).add(p["pid"])
    assert statuses == {"gone": attached, "killed": {stubborn.pid}, "spared": pids(fake_worker, "nohup", "setsid")}
    assert not alive(stubborn.pid)
    assert all(alive(p) for p in pids(fake_worker, "nohup", "setsid"))


# ------------------------------------------- read-only and full state folders


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 16 KiB at ``tmp_path/mnt`` (as root, permissions would not stop a write); unmounted after."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def remount_read_only(mnt):
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


def fill(mnt):
    """Fill the filesystem at *mnt* to the last byte."""
    with open(mnt / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 1024)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    with pytest.raises(OSError):
        (mnt / "probe").write_bytes(b"x" * 4096)
    (mnt / "probe").unlink()  # an inode still fits; its data did not


@needs_root
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_savepid_into_an_unwritable_folder_keeps_the_old_record(real_procs, project, small_tmpfs, fault):
    """One line, exit 1, the previous record intact and no temporary file left; nothing signalled."""
    worker = start_fake_celery(real_procs, project)
    state = small_tmpfs / "state.json"
    assert savepid(project, state).returncode == 0
    before = state.read_bytes()
    extra = real_procs.spawn(["sleep", str(LIFETIME)], process_group=worker.pid)  # the tree grew: a new record differs
    if fault == "read-only":
        remount_read_only(small_tmpfs)
    else:
        fill(small_tmpfs)

    res = savepid(project, state)

    assert res.returncode == 1, (res.stdout, res.stderr)
    one_error_line(res, str(state), "cannot write", "Read-only file system" if fault == "read-only" else "No space")
    assert res.stdout == ""
    assert state.read_bytes() == before
    assert json.loads(before)["workers"][0]["main"] == worker.pid
    assert sorted(os.listdir(small_tmpfs)) == (["state.json"] if fault == "read-only" else ["filler", "state.json"])
    assert worker.is_running() and extra.is_running()
    # And the kill still works from the old record.
    killed = run(project, "kill", str(state), "--grace", "2")
    assert killed.returncode == 0, killed.stderr
    assert not alive(worker.pid) and not alive(extra.pid)


@needs_root
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_requeue_beside_an_unwritable_ledger_sends_nothing(project, small_tmpfs, tmp_path, fault):
    """The ledger is written before the first send: a folder that cannot hold it fails with nothing sent."""
    from celery_supervise.celery_side import fs_transport
    from celery_supervise.processes.snapshot import Task

    main = snapshot.read_worker(os.getpid())  # any live process will do: requeue never signals
    task = Task(id="fault-task-1", name="faultapp.work", args=[1], kwargs={},
                delivery_info={"exchange": "", "routing_key": "celery"}, worker_pid=os.getpid(),
                acknowledged=True, time_start=time.time())
    worker = snapshot.Worker(main=main.main, procs=(main.main,), node="celery@x", app="faultapp", tasks=(task,))
    state = small_tmpfs / "state.json"
    statefile.write(str(state), statefile.to_document(snapshot.take([worker], "control"), Policy(), []))
    if fault == "read-only":
        remount_read_only(small_tmpfs)
    else:
        fill(small_tmpfs)

    res = run(project, "-A", "faultapp", "requeue", str(state))

    assert res.returncode == 1, (res.stdout, res.stderr)
    one_error_line(res, "state.json.requeued", "cannot write")
    assert not os.path.exists(str(state) + ".requeued")
    assert list(fs_transport.queued_task_ids(str(tmp_path / "broker" / "data"))) == []
