"""The /proc readers, against real processes."""

from celery_supervise.processes import procs

from realprocs import wait_for

LIFETIME = 60


def test_child_pids_lists_a_thousand_children(real_procs):
    """Regression: ``children`` comes a page (4,096 bytes) per read.

    A read shorter than asked for was taken for the end of the file, so a
    process's 683rd and later children (5-digit PIDs) were never walked:
    savepid, status and the listener's records lost them.
    """
    count = 1000
    parent = real_procs.spawn(["bash", "-c", f"for i in $(seq {count}); do sleep {LIFETIME} & done; wait"])
    path = f"/proc/{parent.pid}/task/{parent.pid}/children"

    def listed():
        with open(path) as f:  # Python's read() loops to the end of the file
            return f.read().split()

    wait_for(lambda: len(listed()) >= count, 30, f"{count} children of bash")
    kids = listed()
    real_procs.track(*(int(k) for k in kids))  # reaped with bash at teardown
    assert len(" ".join(kids)) > 4096, "the file fits in one page: the test proves nothing"
    assert sorted(procs.child_pids(parent.pid)) == sorted(int(k) for k in kids)
    assert sorted(procs.child_pids(parent.pid, threads=1)) == sorted(int(k) for k in kids)
    assert len(list(procs.walk(procs.read_proc(parent.pid)))) == count


def sighup_ignored_in_status(pid: int) -> bool:
    """SIGHUP's bit of ``SigIgn`` in ``/proc/PID/status``: a second reading of what read_proc takes from ``stat``."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & 1)


def test_read_proc_agrees_with_psutil_on_a_real_tree(real_procs):
    """Every field :func:`procs.read_proc` reads, against psutil's own reading of the same processes.

    ::

        bash                       (ours, attached)
        ├── sleep                  attached
        ├── nohup sleep            ignores SIGHUP
        └── setsid sleep           own session

    The uid is the owner of ``/proc/PID``: for these (dumpable) processes
    the effective uid, which is also their real uid.
    """
    import os

    import psutil

    parent = real_procs.spawn(["bash", "-c", f"sleep {LIFETIME} & nohup sleep {LIFETIME} >/dev/null 2>&1 & "
                                             f"setsid sleep {LIFETIME} & wait"])
    wait_for(lambda: len(procs.child_pids(parent.pid)) >= 3, 30, "three children of bash")
    kids = procs.child_pids(parent.pid)
    real_procs.track(*kids)
    for pid in [parent.pid, *kids]:
        ours, theirs = procs.read_proc(pid), psutil.Process(pid)
        assert ours.ppid == theirs.ppid()
        assert ours.pgid == os.getpgid(pid) and ours.sid == os.getsid(pid)
        assert ours.same_process(theirs)
        assert ours.cmdline == tuple(theirs.cmdline())
        assert ours.uid == theirs.uids().effective == theirs.uids().real
        assert ours.sighup_ignored == sighup_ignored_in_status(pid)
    walked = {p.pid for p in procs.walk(procs.read_proc(parent.pid))}
    assert walked == {k.pid for k in psutil.Process(parent.pid).children(recursive=True)}


def test_the_uid_is_the_effective_uid_for_a_non_dumpable_process_too(real_procs):
    """The owner of ``/proc/PID``, which read_proc records as the uid, is the effective uid even when
    the process is not dumpable: the kernel gives root the *files* of such a process, not its directory.
    """
    import os
    import subprocess
    import sys

    import pytest

    if os.geteuid() != 0:
        pytest.skip("changing uid needs root")
    code = ("import ctypes, os, sys, time; os.setuid(65534); ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
            f"print('ready', flush=True); time.sleep({LIFETIME})")  # 4: PR_SET_DUMPABLE
    child = real_procs.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"
    assert os.stat(f"/proc/{child.pid}/stat").st_uid == 0, "dumpable after all: the test proves nothing"
    assert procs.read_proc(child.pid).uid == 65534


def test_tree_grew_sees_a_recorded_process_fork(real_procs, tmp_path):
    """The listener's idle check: nothing new while the tree is still; a fork below a recorded process is seen.

    ::

        bash                 recorded
        └── bash             recorded; blocks reading a FIFO (no fork meanwhile), then forks
            └── sleep        born after the record: seen
    """
    import os

    from celery_supervise.processes import snapshot

    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    outer = real_procs.spawn(["bash", "-c", f"bash -c 'read -r _ < {fifo}; sleep {LIFETIME} & wait' & wait"])
    [inner] = wait_for(lambda: procs.child_pids(outer.pid), 10, "the inner bash")
    real_procs.track(inner)
    record = snapshot.read_worker(outer.pid)
    assert {p.pid for p in record.procs} == {outer.pid, inner}
    assert not procs.tree_grew(record.procs)
    with open(fifo, "w") as f:  # blocks until the inner bash opens its end: no sleep needed
        f.write("go\n")
    kids = wait_for(lambda: procs.child_pids(inner), 10, "the fork")
    real_procs.track(*kids)
    assert procs.tree_grew(record.procs)
    assert not procs.tree_grew(snapshot.read_worker(outer.pid).procs)


def test_tree_grew_on_a_reused_pid_and_not_on_a_death(real_procs):
    """A recorded PID naming another process now (another creation time) is a change; a death is not."""
    import dataclasses

    from celery_supervise.processes import snapshot

    parent = real_procs.spawn(["bash", "-c", f"sleep {LIFETIME} & sleep {LIFETIME} & wait"])
    wait_for(lambda: len(procs.child_pids(parent.pid)) == 2, 10, "two children")
    record = snapshot.read_worker(parent.pid)
    real_procs.track(*(p.pid for p in record.procs[1:]))
    assert not procs.tree_grew(record.procs)
    older = tuple(dataclasses.replace(p, create_time=p.create_time - 100) if i == 2 else p
                  for i, p in enumerate(record.procs))
    assert procs.tree_grew(older)  # as if that PID had been reused since the record
    import psutil

    kid = psutil.Process(record.procs[2].pid)
    kid.kill()
    wait_for(lambda: kid.pid not in procs.child_pids(parent.pid), 10, "the child reaped")
    assert not procs.tree_grew(record.procs)
