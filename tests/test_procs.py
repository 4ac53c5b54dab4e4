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
