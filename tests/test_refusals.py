"""Every refusal the README's threat model lists, triggered for real, with nothing signalled.

Each test records a live signal witness (``tests/programs/signal_witness.py``)
under its *true* identity wherever it can, so that if the refusal were
missing the kill would really reach it; then it checks the one-line
message and exit code, or the ``refused`` outcome and its reason, and that
the witness got no signal. Refusals already proven elsewhere are named in
the README's table with their own tests.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from celery_supervise.commands import kill as kill_cmd
from celery_supervise.processes import plan, snapshot, statefile
from celery_supervise.processes.kill import REFUSED
from celery_supervise.processes.plan import Policy
from celery_supervise.processes.procs import Proc, read_proc

from realprocs import HANDSHAKE_TIMEOUT, wait_for
from test_fuzz import NO_SUCH_PID, WITNESS, Witness, private_lock  # noqa: F401 (a fixture)

NOBODY = 65534


@pytest.fixture
def spawn_witness(real_procs, tmp_path):
    """Factory: a signal witness running as *argv0* with *extra* arguments, in its own process group."""
    count = [0]

    def spawn(argv0=None, extra=(), cwd=None):
        count[0] += 1
        folder = tmp_path / f"witness{count[0]}"
        folder.mkdir()
        argv = [argv0 or sys.executable, WITNESS, str(folder), "120", *extra]
        proc = real_procs.spawn(argv, executable=sys.executable, process_group=0, cwd=str(cwd or real_procs.workdir))
        wait_for(lambda: proc.poll() is None and (folder / "ready").exists() or _died(proc),
                 HANDSHAKE_TIMEOUT, "the witness's handlers")
        return Witness(proc, str(folder))

    return spawn


def _died(proc):
    if proc.poll() is not None:
        raise AssertionError(f"the witness exited with {proc.returncode}")
    return False


@pytest.fixture
def witness(spawn_witness):
    return spawn_witness()


def cli(*args, lock=None, cwd=None):
    env = dict(os.environ)
    if lock:
        env["CELERY_SUPERVISE_LOCK"] = lock
    return subprocess.run([sys.executable, "-m", "celery_supervise", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=env, cwd=cwd)


def document(*workers, policy=Policy()):
    return statefile.to_document(snapshot.take(workers, "test"), policy, plan.plan(workers, policy))


def true_record(witness):
    """A record of the witness as a worker main, with its true identity: a kill would kill it."""
    return document(snapshot.read_worker(witness.pid))


def absent_main():
    return Proc(pid=NO_SUCH_PID, ppid=1, create_time=1.0, pgid=NO_SUCH_PID, sid=1,
                                            uid=0, cmdline=(), sighup_ignored=False, role="main")


def write(path, doc):
    path = str(path)
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))
    os.chmod(path, 0o600)
    return path


def assert_error(res, message, witness):
    """Exit 1, one line on stderr naming the problem, nothing on stdout, no signal."""
    lines = res.stderr.splitlines()
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("celery-supervise: error: "), res.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    witness.assert_untouched()


def outcomes(res):
    assert res.returncode == 0, res.stderr
    return {p["pid"]: (p["status"], p["reason"]) for p in json.loads(res.stdout)["processes"]}


# ----------------------------------------------------- the state file itself


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_not_a_regular_file(kind, witness, tmp_path, private_lock):
    path = tmp_path / "state.json"
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.mkdir(mode=0o700)
    assert_error(cli("kill", str(path), "--grace", "0", lock=private_lock), "is not a regular file", witness)


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o707])
def test_folder_others_may_write(mode, witness, tmp_path, private_lock):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = write(folder / "state.json", true_record(witness))
    os.chmod(folder, mode)
    assert_error(cli("kill", path, "--grace", "0", lock=private_lock),
                 f"which others may write (mode {mode:04o}, no sticky bit)", witness)


def test_sticky_folder_is_trusted(witness, tmp_path, private_lock):
    """As /tmp: others may create files there, but not rename or remove ours."""
    folder = tmp_path / "sticky"
    folder.mkdir()
    path = write(folder / "state.json", true_record(witness))
    os.chmod(folder, 0o1777)
    res = cli("kill", path, "--dry-run", "--json", lock=private_lock)
    assert outcomes(res)[witness.pid][0] == "would kill"
    witness.assert_untouched()


def spoil(key, value):
    def apply(doc):
        doc[key] = value
        return doc
    return apply


def spoil_worker(key, value):
    def apply(doc):
        doc["workers"][0][key] = value
        return doc
    return apply


CONTENT = {
    "invalid policy": (spoil("policy", "kill-everything"), "has an invalid policy"),
    "no workers list": (spoil("workers", {"a": 1}), "has no workers list"),
    "first process not main": (spoil_worker("main", 12345), "the first process is not the worker's main process"),
    "NaN boot time": (spoil("boot_time", float("nan")), "boot_time: nan is not a finite number"),
    "supervisord PID 1": (spoil_worker("supervisor_pid", 1), "supervisor_pid: names PID 1"),
}


@pytest.mark.parametrize("case", list(CONTENT))
def test_bad_content(case, witness, tmp_path, private_lock):
    change, message = CONTENT[case]
    path = write(tmp_path / "state.json", change(true_record(witness)))
    assert_error(cli("kill", path, "--grace", "0", lock=private_lock), message, witness)


# ------------------------------------------------------------ the reaper lock


def test_lock_file_of_another_user(witness, tmp_path):
    path = write(tmp_path / "state.json", true_record(witness))
    lock = tmp_path / "reaper.lock"
    lock.write_text("")
    os.chown(lock, NOBODY, NOBODY)
    assert_error(cli("kill", path, "--grace", "0", lock=str(lock)), "is not a regular file of ours; refusing", witness)


def test_lock_file_that_is_a_symlink(witness, tmp_path):
    path = write(tmp_path / "state.json", true_record(witness))
    lock = tmp_path / "reaper.lock"
    lock.symlink_to(tmp_path / "elsewhere")
    assert_error(cli("kill", path, "--grace", "0", lock=str(lock)), "cannot open the lock file", witness)
    assert not (tmp_path / "elsewhere").exists()


# ------------------------------------------------- processes the plan refuses


def test_a_recorded_pid_now_held_by_another_process(witness, tmp_path, private_lock):
    """The recorded creation time differs from the live one: the PID names somebody else now."""
    live = snapshot.read_worker(witness.pid)
    main = dataclasses.replace(live.main, create_time=live.main.create_time - 5.0)
    path = write(tmp_path / "state.json", document(snapshot.Worker(main=main, procs=(main,))))
    done = outcomes(cli("kill", path, "--grace", "0", "--json", lock=private_lock))
    assert done[witness.pid] == (REFUSED, "PID now held by another process (creation time differs)")
    witness.assert_untouched()


def test_supervisord_by_its_command(spawn_witness, tmp_path, private_lock):
    """Any process running ``supervisord`` is refused, even recorded as a worker main with its true identity."""
    sup = spawn_witness(argv0="supervisord")
    path = write(tmp_path / "state.json", true_record(sup))
    done = outcomes(cli("kill", path, "--grace", "0", "--json", lock=private_lock))
    assert done[sup.pid] == (REFUSED, "supervisord")
    sup.assert_untouched()


def test_supervisord_the_record_names(witness, tmp_path, private_lock):
    """The worker's recorded supervisor_pid is refused, whatever it runs."""
    me = snapshot.read_worker(witness.pid).main.with_role("task")
    main = absent_main()
    worker = snapshot.Worker(main=main, procs=(main, me), supervisor_pid=witness.pid)
    path = write(tmp_path / "state.json", document(worker, policy=Policy.parse("none")))
    done = outcomes(cli("kill", path, "--grace", "0", "--json", lock=private_lock))
    assert done[witness.pid] == (REFUSED, "supervisord")
    witness.assert_untouched()


def test_an_ancestor_and_what_runs_below_it(witness, tmp_path, private_lock):
    """pytest, the CLI's parent, recorded with its true identity: it and its children (the witness) are refused."""
    pytest_proc = read_proc(os.getpid())
    main = absent_main()
    worker = snapshot.Worker(main=main, procs=(main, pytest_proc))
    path = write(tmp_path / "state.json", document(worker, policy=Policy.parse("none")))
    done = outcomes(cli("kill", path, "--grace", "0", "--json", lock=private_lock))
    assert done[os.getpid()] == (REFUSED, "an ancestor of this tool")
    assert done[witness.pid] == (REFUSED, f"below {os.getpid()} (an ancestor of this tool)")
    witness.assert_untouched()


def test_this_tool_itself_and_what_runs_below_it(witness, tmp_path, private_lock):
    """In process, so that the tool is pytest: a record naming it refuses it and its children."""
    me = read_proc(os.getpid())
    main = absent_main()
    worker = snapshot.Worker(main=main, procs=(main, me))
    path = write(tmp_path / "state.json", document(worker, policy=Policy.parse("none")))
    report = kill_cmd.kill(path, grace=0)
    done = {o.proc.pid: (o.status, o.reason) for o in report.outcomes}
    assert done[os.getpid()] == (REFUSED, "this tool itself")
    assert done[witness.pid] == (REFUSED, f"below {os.getpid()} (this tool itself)")
    witness.assert_untouched()


# ------------------------------------------------------ the old bare PID list


def test_legacy_pid_that_is_not_a_celery_worker(witness, tmp_path, private_lock):
    path = write(tmp_path / "pids.txt", f"{witness.pid}\n")
    done = outcomes(cli("kill", path, "--grace", "0", "--json", lock=private_lock))
    assert done[witness.pid] == (REFUSED, "not a Celery worker (PID recycled?)")
    witness.assert_untouched()


def test_legacy_pid_of_another_apps_worker(spawn_witness, tmp_path, private_lock):
    other = spawn_witness(argv0="celery", extra=("-A", "otherproj", "worker"))
    path = write(tmp_path / "pids.txt", f"{other.pid}\n")
    done = outcomes(cli("-A", "myproj", "kill", path, "--grace", "0", "--json", lock=private_lock))
    assert done[other.pid] == (REFUSED, "a worker of another app (otherproj)")
    other.assert_untouched()


def project(folder):
    """A folder holding a package ``proj``, as a project's folder holds its app."""
    (folder / "proj").mkdir(parents=True)
    (folder / "proj" / "__init__.py").write_text("")
    return folder


def test_legacy_pid_of_the_same_apps_worker_in_another_project(spawn_witness, tmp_path, private_lock):
    """Both projects call their app ``proj``: the worker that runs from the other folder is not ours."""
    ours, theirs = project(tmp_path / "ours"), project(tmp_path / "theirs")
    mine = spawn_witness(argv0="celery", extra=("-A", "proj", "worker"), cwd=ours)
    other = spawn_witness(argv0="celery", extra=("-A", "proj", "worker"), cwd=theirs)
    path = write(tmp_path / "pids.txt", f"{mine.pid} {other.pid}\n")
    done = outcomes(cli("-A", "proj", "kill", path, "--grace", "5", "--json", lock=private_lock, cwd=ours))
    assert done[other.pid] == (REFUSED, f"a worker of another project (proj in {theirs}, ours is in {ours})")
    other.assert_untouched()
    assert done[mine.pid] == ("killed", "worker main process") and mine.signals() == "SIGTERM\n"


def test_legacy_pid_when_our_project_cannot_be_found(spawn_witness, tmp_path, private_lock):
    """Run from a folder where -A proj cannot be imported: whose worker it is cannot be told."""
    theirs, elsewhere = project(tmp_path / "theirs"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = spawn_witness(argv0="celery", extra=("-A", "proj", "worker"), cwd=theirs)
    path = write(tmp_path / "pids.txt", f"{other.pid}\n")
    done = outcomes(cli("-A", "proj", "kill", path, "--grace", "0", "--json", lock=private_lock, cwd=elsewhere))
    assert done[other.pid][0] == REFUSED
    assert done[other.pid][1].startswith("cannot tell whose project it is: -A proj cannot be found from here")
    other.assert_untouched()


# ------------------------------------------------------------- the listener


def test_listener_outside_supervisord(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    res = subprocess.run([sys.executable, "-m", "celery_supervise", "listener", "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["celery-supervise: usage: the listener must run under supervisord "
                                       "as an [eventlistener:x] section"]


def test_listener_whose_parent_is_not_supervisord(tmp_path):
    env = {**os.environ, "SUPERVISOR_SERVER_URL": "unix:///nonexistent.sock", "SUPERVISOR_PROCESS_NAME": "x"}
    res = subprocess.run([sys.executable, "-m", "celery_supervise", "listener", "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["celery-supervise: usage: the listener's parent is not supervisord; "
                                       "run it as an [eventlistener:x] section"]



def test_listener_state_dir_others_may_write(tmp_path):
    """Every record there would be refused and nothing ever reaped: the listener will not start."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    env = {**os.environ, "SUPERVISOR_SERVER_URL": "unix:///nonexistent.sock", "SUPERVISOR_PROCESS_NAME": "x"}
    # Run as supervisord would: the listener's parent must be called supervisord.
    res = subprocess.run(["supervisord", "-c", "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)",
                          sys.executable, "-m", "celery_supervise", "listener", "--state-dir", str(folder)],
                         executable=sys.executable, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, env=env)
    assert res.returncode == 1, res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith("celery-supervise: error: ") and "which others may write (mode 0777" in line


def test_plan_refuses_below_a_protected_main():
    """The pure rule: a protected main's pool and task processes are refused with it, before any role rule.

    1000 main (protected: PID 1 here)   refuse  PID 1
    └── 1001 pool                       refuse  below 1000 (PID 1)
        └── 1010 sleep                  refuse  below 1000 (PID 1)
    """
    def proc(pid, ppid, role):
        return Proc(pid=pid, ppid=ppid, create_time=float(pid), pgid=1000, sid=1000, uid=0, cmdline=("x",),
                    sighup_ignored=False, role=role)

    main = proc(1000, 1, "main")
    worker = snapshot.Worker(main=main, procs=(main, proc(1001, 1000, "pool"), proc(1010, 1001, "task")))
    got = {v.proc.pid: (v.action, v.reason) for v in plan.plan([worker], Policy(), {1000: "PID 1"})}
    assert got == {1000: ("refuse", "PID 1"), 1001: ("refuse", "below 1000 (PID 1)"),
                   1010: ("refuse", "below 1000 (PID 1)")}
