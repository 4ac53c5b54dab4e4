"""What a ``spawn_family`` task leaves behind, and what celery-supervise should do with it.

Each running ``demo.tasks.spawn_family`` task starts, below its pool
process (see ``django_app/demo/tasks.py``)::

    1001 pool                      kill    pool process
    ├── 1010 sleep                 kill    attached          plain
    ├── 1011 sh                    kill    attached          plain_grandparent
    │   └── 1012 sleep             kill    attached          plain_grandchild
    ├── 1013 nohup sleep           spare   nohup             nohup
    └── 1014 sh (setsid)           spare   own session       setsid
        └── 1015 sleep             spare   child of spared   setsid_grandchild

The e2e tests start these families in a real worker, record them with the
real command line, stop supervisord and check, process by process, what the
tool decided and what is still alive.
"""

import json
import subprocess
from dataclasses import dataclass

import psutil

from realprocs import is_gone
from realsupervisor import BIN

#: Task children that must die with the worker.
ATTACHED = ("plain", "plain_grandparent", "plain_grandchild")
#: Task children detached on purpose, which must survive it.
DETACHED = ("nohup", "setsid", "setsid_grandchild")

#: How long a celery-supervise command may take (it loads Django and Celery).
CLI_TIMEOUT = 60


@dataclass
class Family:
    """One ``spawn_family`` task: its marker and its children by role."""

    marker: dict
    procs: dict  # role -> psutil.Process

    @property
    def task_id(self):
        return self.marker["task_id"]

    @property
    def pool_pid(self):
        return self.marker["pool_pid"]

    def pids(self, *roles):
        return {self.procs[role].pid for role in roles}

    def verdicts(self):
        """``{pid: (action, reason)}`` that savepid and status must give the children."""
        out = {pid: ("kill", "attached to the worker") for pid in self.pids(*ATTACHED)}
        out[self.procs["nohup"].pid] = ("spare", "nohup")
        out[self.procs["setsid"].pid] = ("spare", "own session")
        out[self.procs["setsid_grandchild"].pid] = ("spare", f"child of spared {self.procs['setsid'].pid}")
        return out


@dataclass
class WorkerTree:
    """A worker's main process and pool processes, tracked for cleanup."""

    main: psutil.Process
    pools: list

    def verdicts(self):
        out = {self.main.pid: ("kill", "worker main process")}
        out.update({p.pid: ("kill", "pool process") for p in self.pools})
        return out


def worker_tree(run, real_procs, concurrency=2):
    """The single worker supervisord runs, with its pool processes."""
    [main_pid] = run.worker_pids()
    [main] = real_procs.track(main_pid)
    pools = real_procs.track(*main.children())
    assert len(pools) == concurrency, f"expected {concurrency} pool processes, found {pools}"
    return WorkerTree(main, pools)


def start_families(client, real_procs, count=2, hold=60, lifetime=90):
    """Send `count` ``spawn_family`` tasks through `client`; return their families.

    Returns once every marker is written, i.e. every child is running.
    """
    task_ids = [client.spawn_family(hold=hold, lifetime=lifetime) for _ in range(count)]
    families = []
    for task_id in task_ids:
        marker = client.wait_for_marker(task_id)
        procs = dict(zip(marker["children"], real_procs.track(*marker["children"].values())))
        assert procs.keys() == marker["children"].keys(), f"a child died early: {marker}"
        families.append(Family(marker, procs))
    return families


def alive(proc):
    return not is_gone(proc)


def identities(procs):
    """``{pid: create_time}`` of the live ones among `procs`."""
    out = {}
    for proc in procs:
        try:
            if alive(proc):
                out[proc.pid] = proc.create_time()
        except psutil.NoSuchProcess:
            pass
    return out


def celery_supervise(*args, cwd, env, timeout=CLI_TIMEOUT):
    """Run the ``celery-supervise`` console script; return the CompletedProcess."""
    return subprocess.run(
        [str(BIN / "celery-supervise"), *args],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def json_output(result):
    """The JSON document a command printed, after checking it succeeded."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout)


def recorded_verdicts(doc):
    """``{pid: (action, reason)}`` from a savepid/status document."""
    return {v["pid"]: (v["action"], v["reason"]) for v in doc["verdicts"]}


def outcomes(doc):
    """``{pid: entry}`` from a kill document."""
    return {p["pid"]: p for p in doc["processes"]}


def kill_statuses(tree, families):
    """``{pid: status}`` the kill must report once supervisord has stopped the worker.

    supervisord SIGKILLed the main process and the kernel its pool
    processes, so those are gone; the task children are still there.
    """
    out = {p.pid: "gone" for p in (tree.main, *tree.pools)}
    for family in families:
        out.update({pid: "killed" for pid in family.pids(*ATTACHED)})
        out.update({pid: "spared" for pid in family.pids(*DETACHED)})
    return out


def shutdown(run, timeout=30):
    """``supervisorctl shutdown``, then wait until supervisord has exited."""
    result = run.ctl("shutdown")
    assert result.returncode == 0, result.stdout + result.stderr
    assert run.wait_exit(timeout=timeout) == 0
