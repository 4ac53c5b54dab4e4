"""A fleet on one broker: another "host" answers too, and nothing local pays for it.

A second worker runs in its own PID namespace (``unshare --pid --fork
--mount-proc``), from another folder, on the same broker and with the same
node name as the local worker. To the broker it is another host: its
replies name PIDs that mean something else here, PID 1 included (its main
process is PID 1 inside its namespace). savepid must record only the local
worker, and kill must signal nothing because of those replies.
"""

import subprocess

import psutil
import pytest

from realprocs import wait_for
from realsupervisor import BIN, copy_project
from taskfamily import alive, celery_supervise, json_output, shutdown, worker_tree


@pytest.mark.e2e
def test_replies_from_another_pid_namespace_never_name_a_local_process(supervisor, real_procs, tmp_path):
    project = copy_project(tmp_path / "project")
    elsewhere = copy_project(tmp_path / "other-host")
    run = supervisor(project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)

    log_path = tmp_path / "other-host.log"
    with open(log_path, "wb") as log:
        other = real_procs.spawn(
            ["unshare", "--pid", "--fork", "--mount-proc", str(BIN / "celery"), "-A", "demo", "worker",
             "-c", "2", "-n", "demo0@%h", "-l", "info"],
            cwd=str(elsewhere), env=run.env, stdout=log, stderr=subprocess.STDOUT,
        )
    wait_for(lambda: b" ready." in log_path.read_bytes(), 45, "the worker in its own PID namespace to be ready")
    other_tree = real_procs.track(*(p.pid for p in psutil.Process(other.pid).children(recursive=True)))
    other_pids = {other.pid, *(p.pid for p in other_tree)}
    [other_main] = [p for p in other_tree if p.ppid() == other.pid]
    # Inside its namespace the other worker's main is PID 1: what its replies say.
    with open(f"/proc/{other_main.pid}/status") as f:
        ns_pids = next(line for line in f if line.startswith("NSpid:")).split()[1:]
    assert ns_pids[-1] == "1"

    state = tmp_path / "state.json"
    record = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", "--reply-timeout", "1",
                                          cwd=project, env=run.env))
    recorded = {p["pid"] for w in record["workers"] for p in w["procs"]}
    assert recorded == {tree.main.pid, *(p.pid for p in tree.pools)}
    assert 1 not in recorded and not recorded & other_pids
    assert [w["main"] for w in record["workers"]] == [tree.main.pid]

    shutdown(run)
    report = json_output(celery_supervise("-A", "demo", "kill", str(state), "--json", "--grace", "5",
                                          cwd=project, env=run.env))
    acted_on = {p["pid"] for p in report["processes"]}
    assert 1 not in acted_on and not acted_on & other_pids
    assert all(alive(p) for p in [other, *other_tree]), "a process of the other 'host' was signalled"
    assert psutil.Process(1).status() != psutil.STATUS_ZOMBIE

    assert real_procs.reap() == []
