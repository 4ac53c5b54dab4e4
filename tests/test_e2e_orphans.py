"""supervisord alone leaves a stopped Celery worker's task children behind.

What ``supervisorctl shutdown`` does to the demo worker, with
``stopwaitsecs=2`` and two ``spawn_family`` tasks running (one per pool
process)::

    1000 celery worker (main)      stopsignal, then SIGKILL from supervisord
    ├── 1001 pool                  SIGKILL from the kernel (PR_SET_PDEATHSIG)
    │   ├── 1010 sleep             survives, re-parented, pgid 1000
    │   ├── 1011 sh                survives, re-parented, pgid 1000
    │   │   └── 1012 sleep         survives, pgid 1000
    │   ├── 1013 nohup sleep       survives (as it should)
    │   └── 1014 sh (setsid)       survives (as it should)
    │       └── 1015 sleep         survives (as it should)
    └── 1002 pool                  the same
        └── ...

The task holds longer than ``stopwaitsecs``, so neither a warm (TERM) nor a
cold (QUIT) shutdown finishes in time: supervisord SIGKILLs the main
process.  Celery sets ``PR_SET_PDEATHSIG=SIGKILL`` in its pool processes,
so the kernel kills them as soon as the main process dies.  Nothing kills
their children: the attached ones, which were meant to die with the
worker, are orphans, still in the worker's process group.  That is what
celery-supervise is for.
"""

import os

import pytest

from realprocs import is_gone, sighup_ignored, wait_gone
from realsupervisor import PROGRAM

pytestmark = pytest.mark.e2e

ATTACHED = ("plain", "plain_grandparent", "plain_grandchild")


@pytest.mark.parametrize("stopsignal", ["QUIT", "TERM"])
def test_supervisord_shutdown_orphans_task_children(supervisor, real_procs, stopsignal):
    run = supervisor(stopsignal=stopsignal, stopwaitsecs=2)
    run.wait_ready()
    [worker_pid] = run.worker_pids()
    [worker] = real_procs.track(worker_pid)
    pool = real_procs.track(*worker.children())
    assert len(pool) == 2
    # else every child of a task would ignore SIGHUP, as if nohup'd
    assert not any(sighup_ignored(p.pid) for p in pool)

    task_ids = [run.celery.spawn_family(hold=60, lifetime=90) for _ in range(2)]
    markers = [run.celery.wait_for_marker(task_id) for task_id in task_ids]
    families = []
    for marker in markers:
        family = dict(zip(marker["children"], real_procs.track(*marker["children"].values())))
        assert family.keys() == marker["children"].keys(), f"a child died early: {marker}"
        families.append((marker, family))

    # Each pool process runs one task: prefetch 1, and neither is free.
    assert sorted(m["pool_pid"] for m in markers) == sorted(p.pid for p in pool)
    for marker, family in families:
        assert marker["pool_pgid"] == worker_pid  # supervisord gives each program its own group
        for role in ATTACHED + ("nohup",):
            assert os.getpgid(family[role].pid) == worker_pid, role
        assert not sighup_ignored(family["plain"].pid)
        assert sighup_ignored(family["nohup"].pid)
        assert os.getsid(family["setsid"].pid) == family["setsid"].pid

    result = run.ctl("shutdown")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Shut down" in result.stdout
    assert run.wait_exit(timeout=30) == 0

    log = run.log()
    assert f"killing '{PROGRAM}_0' ({worker_pid}) with SIGKILL" in log, log
    assert f"stopped: {PROGRAM}_0 (terminated by SIGKILL)" in log, log
    assert wait_gone([worker, *pool], timeout=10) == []

    for marker, family in families:
        for role, proc in family.items():
            assert not is_gone(proc), f"{role} of {marker['task_id']} died with the worker"
        for role in ("plain", "plain_grandparent", "nohup", "setsid"):
            # re-parented: to init, or to whichever subreaper is nearest
            assert family[role].ppid() != marker["pool_pid"], role
        assert family["plain_grandchild"].ppid() == family["plain_grandparent"].pid
        for role in ATTACHED:
            assert os.getpgid(family[role].pid) == worker_pid, role

    # Clean up every process this test observed, by PID and identity.
    assert real_procs.reap() == []
    assert all(is_gone(proc) for _, family in families for proc in family.values())
