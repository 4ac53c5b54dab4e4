"""The /proc readers, against real processes."""

from celery_supervise import procs

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
        assert ours.sighup_ignored == procs.sighup_ignored(pid)
    walked = {p.pid for p in procs.walk(procs.read_proc(parent.pid))}
    assert walked == {k.pid for k in psutil.Process(parent.pid).children(recursive=True)}
