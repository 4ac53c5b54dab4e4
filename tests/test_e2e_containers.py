"""Containers: supervisord as PID 1 of its PID namespace, or tini as PID 1 with supervisord below it.

Each test runs a :class:`realcontainer.Container`: ``unshare --pid --fork
--mount-proc``, supervisord (``-n``) as PID 1 inside, or tini with
supervisord as its child, running the demo worker (``-c 1``, priority 200,
``stopwaitsecs=2``) from a private copy of the demo project, a bystander
program (a signal witness: supervisord's other program, in a process group
of its own, that must never get a signal) and, in most tests, the listener
(priority 100, ``--grace 2``). celery-supervise runs inside, as supervisord's
eventlistener or through ``nsenter`` (as ``docker exec`` would run it). A
``spawn_family`` task leaves, below the pool process::

    1 supervisord (or tini → 2 supervisord)   alive, never signalled
    ├── 7 celery worker (main)                 stopped by supervisord
    │   └── 9 pool                             dies with it
    │       ├── sleep / sh → sleep             killed     attached (re-parented to PID 1 first)
    │       ├── nohup sleep                    spared     nohup
    │       └── sh (setsid) → sleep            spared     own session
    └── 8 bystander (signal witness)           never signalled

Inside, the PIDs are the namespace's: the records, reports and task markers
name those, and the test translates to host PIDs to watch the processes.
A spared process lives until its namespace ends, as in any container.
"""

import json
import sys
from dataclasses import dataclass

import pytest

from realcontainer import Container, require_tini
from realprocs import is_gone, wait_for, wait_gone
from realsupervisor import BIN, PROGRAM, copy_project, listener_section
from taskfamily import ATTACHED, DETACHED, celery_supervise
from test_e2e_listener import Listening
from test_fuzz import WITNESS, Witness

pytestmark = pytest.mark.e2e

GRACE = 2
LISTENER = "celery-supervise"
BYSTANDER = "bystander"


@dataclass
class Family:
    """A ``spawn_family`` task's children: host processes and their PIDs inside, by role."""

    marker: dict  # as the task wrote it: PIDs inside the container
    procs: dict  # role -> psutil.Process (host view)

    def ns(self, role):
        return self.marker["children"][role]

    def of(self, *roles):
        return [self.procs[r] for r in roles]


@dataclass
class Setup:
    run: Container
    project: object
    bystander: Witness
    listening: Listening

    def main(self):
        """The worker's main process: (PID inside, host process)."""
        [ns] = self.run.group_pids(PROGRAM).values()
        return ns, self.run.host_process(ns)

    def family(self, real_procs, hold):
        marker = self.run.celery.wait_for_marker(self.run.celery.spawn_family(hold=hold, lifetime=90))
        procs = {role: real_procs.track(self.run.host_pid(pid))[0] for role, pid in marker["children"].items()}
        return Family(marker, procs)

    def inside(self, *args):
        return self.run.celery_supervise(*args, cwd=self.project)

    def assert_untouched(self, family):
        """Attached children gone, detached alive; PID 1, supervisord and the bystander alive and never signalled."""
        assert wait_gone(family.of(*ATTACHED), timeout=5) == []
        assert [p for p in family.of(*DETACHED) if is_gone(p)] == []
        assert self.run.init.is_running(), "PID 1 died"
        self.bystander.assert_untouched("(supervisord's other program)")
        log = self.run.log()
        assert "received SIG" not in log, log  # supervisord would log any signal it (or tini before it) got

    def wait_new_worker(self, old_ns):
        self.run.wait_ready()
        new_ns, new = self.main()
        assert new_ns != old_ns and not is_gone(new)
        return new_ns


def outcome_by_ns_pid(doc):
    return {p["pid"]: p for p in doc["processes"]}


def assert_reaped(doc, family):
    """A kill document (the listener's report or ``kill --json``): attached killed or gone, detached spared."""
    got = outcome_by_ns_pid(doc)
    for role in ATTACHED:
        assert got[family.ns(role)]["status"] in ("killed", "gone"), (role, doc)
    assert got[family.ns("nohup")]["reason"] == "nohup", doc
    assert got[family.ns("setsid")]["reason"] == "own session", doc
    assert {got[family.ns(role)]["status"] for role in DETACHED} == {"spared"}, doc
    assert doc["summary"]["failed"] == 0 and doc["summary"]["refused"] == 0, doc
    assert 1 not in got, "PID 1 is in the kill's table"


@pytest.fixture
def container(tmp_path, real_procs):
    """Factory: ``container(init=(), listener=True, **Supervisord options)``, started, worker ready."""
    started = []

    def start(init=(), listener=True, **options):
        project = copy_project(tmp_path / "project")
        witness_dir = tmp_path / "bystander"
        witness_dir.mkdir()
        extra = (f"\n[program:{BYSTANDER}]\ncommand={sys.executable} {WITNESS} {witness_dir} 300\n"
                 "autostart=true\nstartsecs=0\nstdout_logfile=NONE\nstderr_logfile=%(here)s/bystander.log\n")
        if listener:
            extra += listener_section(BIN / "celery-supervise", GRACE, project, name=LISTENER,
                                      stdout_logfile="%(here)s/listener.stdout")
        options.setdefault("stopwaitsecs", 2)
        (tmp_path / "container").mkdir()
        run = Container(tmp_path / "container", init=init, priority=200, extra=extra, project_dir=project,
                        concurrency=1, env={"CELERY_SUPERVISE_LOCK": str(tmp_path / "reaper.lock")}, **options)
        started.append(run)
        run.start()
        run.extra_logs += ["listener.log", "bystander.log"]
        run.wait_ready()
        wait_for(lambda: (witness_dir / "ready").exists(), 10, "the bystander's signal handlers")
        bystander = Witness(run.host_process(run.group_pids(BYSTANDER)[BYSTANDER]), str(witness_dir))
        setup = Setup(run, project, bystander, Listening(run, real_procs))
        if listener:
            setup.listening.wait_recorded([setup.main()[0]])
        return setup

    yield start
    for run in reversed(started):
        run.stop()


def test_supervisord_pid_1_listener_and_savepid_over_xmlrpc_on_supervisorctl_restart(container, real_procs, tmp_path):
    """The listener's records are no longer set aside; a savepid through XML-RPC is kill-able.

    ``supervisorctl restart`` stops the worker (SIGKILL after stopwaitsecs:
    the task holds), the listener reaps at its exit, supervisord starts a
    new one. The attached orphans' new parent is supervisord itself (PID 1),
    and they are killed all the same.
    """
    box = container()
    old_ns, old = box.main()
    family = box.family(real_procs, hold=60)
    real_procs.track(old, *old.children())
    # main, pool and the six children: the tree the listener must have before the stop
    box.listening.wait_entries("recorded", pid=old_ns, processes=lambda n: n >= 8)
    state = tmp_path / "state.json"
    # From the host, the container's supervisord says its PID is 1, and its PIDs name strangers here.
    outside = celery_supervise("-A", "demo", "savepid", str(state), "--supervisor-url", f"unix://{box.run.socket}",
                               cwd=box.project, env=box.run.env)
    assert outside.returncode == 1 and "runs in another PID namespace" in outside.stderr, outside.stderr
    assert not state.exists()
    saved = box.inside("-A", "demo", "savepid", str(state), "--supervisor-url", f"unix://{box.run.socket}",
                       "--program", f"{PROGRAM}:*", "--json")
    assert saved.returncode == 0, saved.stderr
    assert [w["supervisor_pid"] for w in json.loads(saved.stdout)["workers"]] == [1]

    result = box.run.ctl("restart", f"{PROGRAM}:*")
    assert result.returncode == 0, result.stdout + result.stderr
    [entry] = box.listening.wait_entries("reaped", record=f"{PROGRAM}_{PROGRAM}_0@{old_ns}.json")
    report = box.listening.reports()[entry["report"].rsplit("/", 1)[-1]]
    assert_reaped(report, family)
    box.listening.check_log()  # no record refused, no error
    assert list(box.listening.state_dir.glob("*.invalid")) == []

    killed = box.inside("-A", "demo", "kill", str(state), "--grace", "2", "--json")
    assert killed.returncode == 0, killed.stderr
    assert_reaped(json.loads(killed.stdout), family)
    box.assert_untouched(family)
    new_ns = box.wait_new_worker(old_ns)
    box.listening.wait_recorded([new_ns])
    assert real_procs.reap() == []


def test_restart_inside_a_container_whose_pid_1_is_supervisord(container, real_procs):
    """``celery-supervise restart``: drained, stopped, leftovers killed, started again, the container intact."""
    box = container(listener=False)
    old_ns, old = box.main()
    real_procs.track(old, *old.children())
    family = box.family(real_procs, hold=0)  # returns at once, leaving its six children

    result = box.inside("-A", "demo", "restart", PROGRAM, "-c", str(box.run.conf_path), "--grace", "3", "--json")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 0 and doc["problem"] is None, doc
    # The pool process may still be exiting when the kill comes (then it is killed too).
    assert len(ATTACHED) <= doc["kill"]["summary"]["killed"] <= len(ATTACHED) + 1, doc["kill"]
    assert doc["kill"]["summary"]["spared"] == len(DETACHED), doc["kill"]
    assert wait_gone([old], timeout=5) == []
    box.assert_untouched(family)
    box.wait_new_worker(old_ns)
    assert real_procs.reap() == []


@pytest.mark.parametrize("init", ["supervisord", "tini"])
def test_orphans_re_parented_to_pid_1_are_killed_by_savepid_stop_kill(init, container, real_procs, tmp_path):
    """The plain flow, with PID 1 the orphans' new parent: supervisord itself, or tini above it.

    savepid through XML-RPC, ``supervisorctl stop`` (SIGKILL after
    stopwaitsecs: the task holds), and only once the attached children
    have been re-parented to PID 1, ``kill``: they are found by the process
    group scan and killed; supervisord's other program, also PID 1's
    child (or, under tini, supervisord's), in a group of its own, is not.
    """
    box = container(init=[require_tini(), "--"] if init == "tini" else (), listener=False)
    assert box.run.ns_pid(box.run.supervisord().pid) == (2 if init == "tini" else 1)
    old_ns, old = box.main()
    family = box.family(real_procs, hold=60)
    real_procs.track(old, *old.children())
    state = tmp_path / "state.json"
    saved = box.inside("-A", "demo", "savepid", str(state), "--supervisor-url", f"unix://{box.run.socket}",
                       "--program", f"{PROGRAM}:*", "--json")
    assert saved.returncode == 0, saved.stderr
    assert [w["supervisor_pid"] for w in json.loads(saved.stdout)["workers"]] == [box.run.ns_pid(box.run.supervisord().pid)]

    result = box.run.ctl("stop", f"{PROGRAM}:*")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: family.procs["plain"].ppid() == box.run.init.pid, 10, "the orphan to be re-parented to PID 1")
    killed = box.inside("-A", "demo", "kill", str(state), "--grace", "2", "--json")
    assert killed.returncode == 0, killed.stderr
    doc = json.loads(killed.stdout)
    assert_reaped(doc, family)
    plain = outcome_by_ns_pid(doc)[family.ns("plain")]
    assert (plain["status"], plain["ppid"], plain["reason"]) == ("killed", 1, "attached orphan of the worker")
    box.assert_untouched(family)

    result = box.run.ctl("start", f"{PROGRAM}:*")
    assert result.returncode == 0, result.stdout + result.stderr
    box.wait_new_worker(old_ns)
    assert real_procs.reap() == []
