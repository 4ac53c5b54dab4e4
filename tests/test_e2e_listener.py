"""The eventlistener under a real supervisord: what survives each way a worker stops.

Each test runs supervisord with the demo worker (priority 200,
``stopwaitsecs=2``) and ``celery-supervise -A demo listener --grace 2``
(priority 100, lower: stopped last on shutdown), both from a private copy
of the demo project and on the guarded filesystem broker.  ``spawn_family`` tasks give every pool process this
family, and each test then stops the worker one way and checks exactly
what is left::

    1000 celery worker (main)          dies        (supervisord, or the listener)
    ├── 1001 pool                      dies        (PR_SET_PDEATHSIG, or the listener)
    │   ├── 1010 sleep                 killed      attached            plain
    │   ├── 1011 sh                    killed      attached            plain_grandparent
    │   │   └── 1012 sleep             killed      attached            plain_grandchild
    │   ├── 1013 nohup sleep           survives    nohup               nohup
    │   └── 1014 sh (setsid)           survives    own session         setsid
    │       └── 1015 sleep             survives    child of spared     setsid_grandchild
    └── 1002 pool                      the same
        └── ...

and that a kill report naming them sits in the state folder.  The tasks hold
for a minute, longer than ``stopwaitsecs``, so every stop ends with
supervisord's SIGKILL of the main process: the case where task children are
orphaned.

Waits are on the listener's own log (one JSON line per action), on files
and on supervisord's RPC, each with a deadline.
"""

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass

import psutil
import pytest

from celery_supervise.processes import audit as auditing

from realprocs import is_gone, wait_for, wait_gone
from realsupervisor import BIN, PROGRAM, copy_project, listener_section

pytestmark = pytest.mark.e2e

GRACE = 2
LISTENER = "celery-supervise"
ATTACHED = ("plain", "plain_grandparent", "plain_grandchild")
DETACHED = ("nohup", "setsid", "setsid_grandchild")
#: A stop with running tasks: stopwaitsecs (2 s), then the reap.
STOP_TIMEOUT = 20
#: The listener sweeps when it starts, after supervisord answers RPC; an
#: orphan's sweep adds a warm stop (GRACE) and the kill (up to GRACE + 2 s).
SWEEP_TIMEOUT = 40

@dataclass
class Family:
    """One ``spawn_family`` task's children, by role."""

    marker: dict
    procs: dict  # role -> psutil.Process

    def of(self, *roles):
        return [self.procs[role] for role in roles]


class Listening:
    """A supervisord running the worker and the listener, and what to watch of it."""

    def __init__(self, run, real_procs):
        self.run = run
        self.real_procs = real_procs
        self.state_dir = run.dir / "state"

    # -- the listener's log

    def entries(self):
        """The listener's log, one dict per action; fails on any other line (a traceback)."""
        path = self.run.dir / "listener.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"listener.log has a line that is not JSON: {line!r}\n"
                                     + self.run.diagnostics()) from None
        return out

    def wait_entries(self, action, count=1, timeout=STOP_TIMEOUT, **match):
        """Wait until the log has `count` `action` lines whose fields contain `match`."""

        def found():
            hits = [e for e in self.entries() if e["action"] == action
                    and all(_matches(e.get(k), v) for k, v in match.items())]
            return hits if len(hits) >= count else None

        try:
            return wait_for(found, timeout, f"{count} {action!r} line(s) matching {match}", interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.run.diagnostics()}") from None

    def wait_recorded(self, pids):
        for pid in pids:
            self.wait_entries("recorded", pid=pid)

    def wait_tree_recorded(self, main, families):
        """Wait until the record of `main` holds its pool and every child of `families`."""
        # main, its pool processes (one per family here) and six children each
        size = 1 + len(main.children()) + sum(len(f.procs) for f in families)
        self.wait_entries("recorded", pid=main.pid, processes=lambda n: n >= size)

    def check_log(self):
        """No malformed event, no error, stdout nothing but the protocol."""
        bad = [e for e in self.entries() if e["action"] in ("malformed", "error", "refused")]
        assert bad == [], bad
        stdout = (self.run.dir / "listener.stdout").read_text()
        assert re.fullmatch(r"(READY\n|RESULT 2\nOK)*", stdout), stdout[:500]

    # -- processes

    def worker_mains(self, track=True):
        """``{process name: psutil.Process}`` of the running workers.

        Tracked for cleanup unless `track` is false: a worker that is to be
        running at the end is left to supervisord's shutdown.
        """
        pids = self.run.group_pids(PROGRAM)
        if track:
            return dict(zip(pids, self.real_procs.track(*pids.values())))
        return {name: psutil.Process(pid) for name, pid in pids.items()}

    def listener_pid(self):
        return self.run.group_pids(LISTENER)[LISTENER]

    def start_families(self, queues):
        """One ``spawn_family`` per queue (``None``: the default); return them once running."""
        task_ids = [self.run.celery.spawn_family(hold=60, lifetime=90, queue=q) for q in queues]
        families = []
        for task_id in task_ids:
            marker = self.run.celery.wait_for_marker(task_id)
            procs = dict(zip(marker["children"], self.real_procs.track(*marker["children"].values())))
            assert procs.keys() == marker["children"].keys(), f"a child died early: {marker}"
            families.append(Family(marker, procs))
        return families

    def reports(self):
        return {p.name: json.loads(p.read_text()) for p in sorted(self.state_dir.glob("*.report.json"))}

    def records(self):
        return sorted(p.name for p in self.state_dir.glob("*.json") if not p.name.endswith(".report.json"))


def celery_supervise(run, *args):
    """Run ``celery-supervise -A demo ARGS`` as a deploy script would; return the CompletedProcess."""
    return subprocess.run([str(BIN / "celery-supervise"), "-A", "demo", *args], cwd=run.project_dir,
                          env=run.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def _matches(value, wanted):
    if callable(wanted):
        return wanted(value)
    return value == wanted


def pools_of(main, real_procs):
    return real_procs.track(*main.children())


def assert_survivors(families, dead=(), alive=()):
    """Attached children and `dead` are gone; detached children and `alive` live: exactly."""
    should_die = [p for f in families for p in f.of(*ATTACHED)] + list(dead)
    should_live = [p for f in families for p in f.of(*DETACHED)] + list(alive)
    # The reap waits until what it killed is gone, but a pool process killed
    # by the kernel (PR_SET_PDEATHSIG) may take a moment longer.
    left = wait_gone(should_die, timeout=5)
    assert left == [], f"still alive: {left}"
    assert [p for p in should_live if is_gone(p)] == []


def assert_report(doc, families, gone=(), killed=(), tasks=None):
    """The kill report lists the attached as killed, the detached as spared, and `gone`/`killed`.

    `gone` are listed as gone (or killed, if still alive at the reap) when
    listed at all: a pool process that died at the very moment the listener
    re-read the tree is missing from the record.
    """
    outcome = {p["pid"]: p["status"] for p in doc["processes"]}
    reason = {p["pid"]: p["reason"] for p in doc["processes"]}
    for f in families:
        for p in f.of(*ATTACHED):
            assert outcome.get(p.pid) == "killed", (p.pid, doc)
        assert reason.get(f.procs["nohup"].pid) == "nohup", doc
        assert reason.get(f.procs["setsid"].pid) == "own session", doc
        assert reason.get(f.procs["setsid_grandchild"].pid) == f"child of spared {f.procs['setsid'].pid}", doc
        for p in f.of(*DETACHED):
            assert outcome[p.pid] == "spared"
    for p in gone:
        assert outcome.get(p.pid, "gone") in ("gone", "killed"), (p.pid, doc)
    for p in killed:
        assert outcome.get(p.pid) == "killed", (p.pid, doc)
    assert doc["summary"]["failed"] == 0 and doc["exit_code"] == 0, doc
    if tasks is not None:
        assert {t["id"] for t in doc["tasks"]} == set(tasks), doc["tasks"]


def assert_audited(audit_log, doc, record, warm_stopped=()):
    """The audit log holds each signal the reap's report says killed a process, and nothing else.

    A process killed by SIGTERM or SIGKILL has that signal ``delivered``;
    every line is the listener's, names *record*, and every intent has its
    outcome. A warm-stopped main (*warm_stopped*) has a SIGTERM of its own.
    """
    lines, bad = auditing.read_lines(str(audit_log))
    assert bad == 0
    delivered = {}
    for line in lines:
        assert line["command"]["verb"] == "listener" and line["record"].endswith(record), line
        if line["outcome"] == auditing.DELIVERED:
            delivered.setdefault(line["process"]["pid"], []).append((line["signal"], line["reason"]))
    expected = {}
    for pid in warm_stopped:
        expected.setdefault(pid, []).append(("SIGTERM", "warm stop: the worker's supervisord is gone"))
    for p in doc["processes"]:
        if p["status"] == "killed" and p["signal"]:
            # SIGKILL: it had its SIGTERM too (delivered, or it died with it while we looked)
            sigs = ["SIGTERM", "SIGKILL"] if p["signal"] == "SIGKILL" else ["SIGTERM"]
            expected.setdefault(p["pid"], []).extend((s, p["reason"]) for s in sigs)
    assert {pid: sorted(v) for pid, v in delivered.items()} == {pid: sorted(v) for pid, v in expected.items()}
    rows = auditing.join(lines)
    assert all(r["intent"] is not None and r["outcome"] is not None for r in rows), rows


@pytest.fixture
def listening(supervisor, real_procs, tmp_path):
    """Factory: supervisord with the worker and the listener, both ready and recorded."""

    # The worker runs from a copy of the demo project, so that no other
    # test's scan for "workers of this project" ever finds it.
    project = copy_project(tmp_path / "project")

    def start(**options):
        options.setdefault("stopwaitsecs", 2)
        extra = listener_section(BIN / "celery-supervise", GRACE, project, name=LISTENER,
                                 stdout_logfile="%(here)s/listener.stdout")
        # A lock of our own: other test sessions on this host may be reaping.
        env = {"CELERY_SUPERVISE_LOCK": str(tmp_path / "reaper.lock")}
        run = supervisor(priority=200, extra=extra, env=env, project_dir=project, **options)
        run.extra_logs.append("listener.log")
        run.wait_ready()
        found = Listening(run, real_procs)
        found.wait_recorded(run.group_pids(PROGRAM).values())
        return found

    return start


def test_stop_kills_attached_leftovers_spares_detached(listening, real_procs, audit_log):
    """``supervisorctl stop``: STOPPING snapshots tree and tasks, the worker's exit triggers the reap."""
    lst = listening()
    [main] = lst.worker_mains().values()
    pools = pools_of(main, real_procs)
    families = lst.start_families([None, None])

    result = lst.run.ctl("stop", f"{PROGRAM}:*")
    assert result.returncode == 0 and "stopped" in result.stdout, result.stdout + result.stderr

    [entry] = lst.wait_entries("reaped")
    assert_survivors(families, dead=[main, *pools])
    assert entry["record"] == f"{PROGRAM}_{PROGRAM}_0@{main.pid}.json"
    reports = lst.reports()
    assert list(reports) == [os.path.basename(entry["report"])]
    # STOPPING came while the worker still answered: the report names its tasks.
    assert_report(reports[os.path.basename(entry["report"])], families, gone=[main, *pools],
                  tasks=[f.marker["task_id"] for f in families])
    stopping = lst.wait_entries("recorded", why="PROCESS_STATE_STOPPING", pid=main.pid)
    assert stopping[0]["tasks"] == 2
    assert lst.records() == []  # the record is consumed by the reap
    lst.check_log()
    assert_audited(audit_log, reports[os.path.basename(entry["report"])], entry["record"])
    assert real_procs.reap() == []


def test_shutdown_then_start_again_numprocs_2(listening, real_procs, tmp_path):
    """The deploy flow: by the time supervisord has exited, each process's leftovers are reaped.

    A deploy script's own savepid/kill around the same shutdown finds
    nothing left to do: the two reapers do not fight.
    """
    lst = listening(numprocs=2, concurrency=1, own_queues=True)
    mains = lst.worker_mains()
    assert sorted(mains) == [f"{PROGRAM}_0", f"{PROGRAM}_1"]
    pools = {name: pools_of(main, real_procs) for name, main in mains.items()}
    families = lst.start_families(["worker0", "worker1"])
    for name, family in zip(sorted(mains), families):
        [pool] = pools[name]
        assert family.marker["pool_pid"] == pool.pid  # each worker runs one family
    state = tmp_path / "deploy-state.json"
    # This supervisord's workers only: a scan would find any demo worker on the host.
    saved = celery_supervise(lst.run, "savepid", str(state), "--supervisor-url", f"unix://{lst.run.socket}",
                             "--program", f"{PROGRAM}:*")
    assert saved.returncode == 0, saved.stderr

    result = lst.run.ctl("shutdown")
    assert result.returncode == 0, result.stdout + result.stderr
    assert lst.run.wait_exit(timeout=STOP_TIMEOUT + 30) == 0

    # No waiting here: supervisord stopped the listener last and waited for it.
    everything = [*mains.values(), *(p for ps in pools.values() for p in ps)]
    assert_survivors(families, dead=everything)
    reaped = {e["record"]: e for e in lst.entries() if e["action"] == "reaped"}
    assert sorted(reaped) == sorted(f"{PROGRAM}_{name}@{main.pid}.json" for name, main in mains.items())
    reports = lst.reports()
    assert len(reports) == 2
    for (name, main), family in zip(sorted(mains.items()), families):
        [doc] = [reports[os.path.basename(e["report"])] for e in reaped.values()
                 if e["record"] == f"{PROGRAM}_{name}@{main.pid}.json"]
        assert_report(doc, [family], gone=[main, *pools[name]])
    assert lst.records() == []

    killed = celery_supervise(lst.run, "kill", str(state), "--grace", "2", "--json")
    assert killed.returncode == 0, killed.stderr
    outcome = {p["pid"]: p["status"] for p in json.loads(killed.stdout)["processes"]}
    assert {outcome[p.pid] for f in families for p in f.of(*ATTACHED)} == {"gone"}
    assert {outcome[p.pid] for f in families for p in f.of(*DETACHED)} == {"spared"}

    lst.run.start()
    lst.run.wait_ready()
    new = lst.worker_mains(track=False)
    assert sorted(new) == sorted(mains) and not set(p.pid for p in new.values()) & set(p.pid for p in mains.values())
    lst.wait_recorded(p.pid for p in new.values())
    assert_survivors(families, dead=everything, alive=new.values())
    assert lst.records() == sorted(f"{PROGRAM}_{name}@{p.pid}.json" for name, p in new.items())
    lst.check_log()
    assert real_procs.reap(timeout=10) == []


def test_stop_all_leftovers_are_reaped_when_the_listener_starts(listening, real_procs):
    """``stop all`` stops the listener first: nothing is reaped until it starts again."""
    lst = listening()
    [main] = lst.worker_mains().values()
    pools = pools_of(main, real_procs)
    families = lst.start_families([None, None])
    lst.wait_tree_recorded(main, families)

    result = lst.run.ctl("stop", "all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(lst.run.states().values()) == {"STOPPED"}
    assert wait_gone([main, *pools], timeout=5) == []
    # The listener got its SIGTERM with the worker still running: it left the
    # record for the next start, and the attached leftovers are still there.
    lst.wait_entries("stopping")
    assert [e for e in lst.entries() if e["action"] == "reaped"] == []
    assert all(not is_gone(p) for f in families for p in f.of(*ATTACHED, *DETACHED))
    assert lst.records() == [f"{PROGRAM}_{PROGRAM}_0@{main.pid}.json"]

    result = lst.run.ctl("start", "all")
    assert result.returncode == 0, result.stdout + result.stderr
    [entry] = lst.wait_entries("reaped", timeout=SWEEP_TIMEOUT)
    assert entry["why"] == "listener started: worker gone"
    lst.run.wait_ready()
    [new] = lst.worker_mains(track=False).values()
    assert new.pid != main.pid
    assert_survivors(families, dead=[main, *pools], alive=[new])
    assert_report(lst.reports()[os.path.basename(entry["report"])], families, gone=[main, *pools])
    lst.check_log()
    assert real_procs.reap(timeout=10) == []


def test_supervisord_killed_then_started_again(listening, real_procs, audit_log):
    """kill -9 of supervisord: the listener leaves at end of input; the next one warm-stops the orphan."""
    lst = listening()
    [main] = lst.worker_mains().values()
    pools = pools_of(main, real_procs)
    [old_listener] = real_procs.track(lst.listener_pid())
    families = lst.start_families([None, None])
    old_supervisord = lst.run.pid

    os.kill(old_supervisord, signal.SIGKILL)
    lst.run.proc.wait(timeout=10)
    # It reads end of input and exits (its log line is lost: stderr was a
    # pipe to supervisord too).
    assert wait_gone([old_listener], timeout=10) == []
    # It touched nothing: the worker and its whole tree live on, orphaned.
    everyone = [main, *pools, *(p for f in families for p in f.procs.values())]
    assert [p for p in everyone if is_gone(p)] == []

    lst.run.start()
    [entry] = lst.wait_entries("reaped", timeout=SWEEP_TIMEOUT)
    assert entry["why"] == f"listener started: orphaned (its supervisord {old_supervisord} is gone)"
    [warm] = lst.wait_entries("warm-stop", pid=main.pid)
    assert warm["result"] == "sent"
    lst.run.wait_ready()
    [new] = lst.worker_mains(track=False).values()
    assert new.pid != main.pid
    assert_survivors(families, dead=[main, *pools], alive=[new])
    # The main outlived its warm-shutdown grace (its tasks hold): killed.
    doc = lst.reports()[os.path.basename(entry["report"])]
    assert_report(doc, families, killed=[main], gone=pools)
    lst.wait_recorded([new.pid])
    lst.check_log()
    assert_audited(audit_log, doc, entry["record"], warm_stopped=[main.pid])
    assert real_procs.reap(timeout=10) == []


def test_worker_killed_is_reaped_and_restarted(listening, real_procs):
    """kill -9 of the worker: the listener reaps at once, supervisord restarts the worker."""
    lst = listening(autorestart=True)
    [main] = lst.worker_mains().values()
    pools = pools_of(main, real_procs)
    families = lst.start_families([None, None])
    # No STOPPING comes before a crash: the listener's periodic re-read has
    # to have seen the children, or the setsid'd ones would not be reported.
    lst.wait_tree_recorded(main, families)

    os.kill(main.pid, signal.SIGKILL)
    [entry] = lst.wait_entries("reaped")
    assert entry["record"] == f"{PROGRAM}_{PROGRAM}_0@{main.pid}.json"

    def restarted():
        pids = lst.run.group_pids(PROGRAM)
        return pids if pids and main.pid not in pids.values() else None

    wait_for(restarted, 30, "supervisord to restart the worker")
    lst.run.wait_ready()
    [new] = lst.worker_mains(track=False).values()
    lst.wait_recorded([new.pid])
    assert_survivors(families, dead=[main, *pools], alive=[new])
    assert_report(lst.reports()[os.path.basename(entry["report"])], families, gone=[main, *pools])
    assert lst.records() == [f"{PROGRAM}_{PROGRAM}_0@{new.pid}.json"]
    lst.check_log()
    assert real_procs.reap(timeout=10) == []
