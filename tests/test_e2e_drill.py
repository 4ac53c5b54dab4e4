"""A fleet drill: three hosts on one broker, drained from outside, deployed and restarted host by host.

Three simulated hosts (:class:`realhosts.Host`: a UTS, PID and mount
namespace each, with a host name of its own) run supervisord as PID 1, the
demo worker (``-c 1``, node ``drill0@<host name>``, consuming the fleet's
shared queue and one of its own), the listener and a bystander (a signal
witness, in a process group of its own), all on Redis db 4 on loopback::

    host drill-<uid>-a (and -b, -c)        its own host name, PIDs and /proc
    1 supervisord                          never signalled
    ├── celery worker (main)  drill0@host  drained, deployed, restarted
    │   └── pool
    │       ├── sleep / sh → sleep         killed     attached (a spawn_family task's)
    │       ├── nohup sleep                spared     nohup
    │       └── sh (setsid) → sleep        spared     own session
    ├── celery-supervise listener          reaps after every stop
    └── bystander (signal witness)         never signalled

The drill, as an operator would run it:

1. ``celery-supervise drain --all`` from the machine itself (outside every
   host): one drain of the whole fleet, while ``mark`` tasks run and wait;
2. on each host in turn, ``celery-supervise deploy --no-shutdown``
   (supervisord is PID 1: it must stay up);
3. a restart host by host: ``celery-supervise restart`` on one host, then
   the next, while more tasks arrive.

Then: every task sent ran to its end (its ``done`` marker), every attached
leftover died, every detached process lives, the bystanders never got a
signal, and no host's tool recorded or reported a process of another host:
each state file and listener record says its own host name, and every
process a host's deploy or restart reported is one of that host's (PID and
creation time, in its own PID namespace).
"""

import json
import sys
import uuid
from dataclasses import dataclass, field

import psutil
import pytest

from brokers import clean_redis, require
from realhosts import Host
from realprocs import is_gone, wait_for, wait_gone
from realsupervisor import BIN, PROGRAM, DemoClient, copy_project, listener_section
from taskfamily import ATTACHED, DETACHED, celery_supervise, json_output
from test_fuzz import WITNESS, Witness

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/4"
HOSTS = 3
GRACE = 2
LISTENER = "celery-supervise"
BYSTANDER = "bystander"
#: mark tasks sent before the drain, and before each host's restart.
MARKS_BEFORE_DRAIN = 6
MARKS_PER_RESTART = 3


@dataclass
class Drilled:
    """One host of the drill and what the test knows of it."""

    host: Host
    project: object
    witness: Witness
    queue: str
    #: (PID inside, creation time) of every process this host's own tool may report.
    own: set = field(default_factory=set)
    #: Each spawn_family's children: role -> (PID inside, host process).
    families: list = field(default_factory=list)

    @property
    def name(self):
        return self.host.hostname

    def inside(self, *args):
        return self.host.celery_supervise(*args, cwd=self.project)

    def main(self):
        """The worker's main process: (PID inside, host process)."""
        [ns] = self.host.group_pids(PROGRAM).values()
        return ns, self.host.host_process(ns)

    def learn_tree(self, real_procs):
        """Note the worker's main and pool processes as this host's own; return the main."""
        ns, main = self.main()
        procs = real_procs.track(main, *main.children())
        self.own.update((self.host.ns_pid(p.pid), p.create_time()) for p in procs)
        return main

    def family(self, client, real_procs):
        """A ``spawn_family`` on this host's own queue that returns at once, leaving its six children."""
        marker = client.wait_for_marker(client.spawn_family(hold=0, lifetime=110, queue=self.queue))
        procs = {role: real_procs.track(self.host.host_pid(pid))[0] for role, pid in marker["children"].items()}
        family = {role: (pid, procs[role]) for role, pid in marker["children"].items()}
        self.own.update((pid, proc.create_time()) for pid, proc in family.values())
        self.families.append(family)
        return family

    def is_own(self, pid, create_time):
        # Same PID inside this host's namespace and, within a clock tick, the same creation time.
        return any(pid == own_pid and abs(create_time - own_time) < 0.005 for own_pid, own_time in self.own)

    def assert_reported_only_own(self, doc, what):
        foreign = [(p["pid"], p["create_time"], p["cmdline"]) for p in doc["processes"]
                   if not self.is_own(p["pid"], p["create_time"])]
        assert foreign == [], f"{self.name}'s {what} reported processes that are not its own: {foreign}"


def start_host(tmp_path, uid, letter, shared_queue):
    name = f"drill-{uid}-{letter}"
    base = tmp_path / letter
    base.mkdir()
    project = copy_project(base / "project")
    witness_dir = base / "bystander"
    witness_dir.mkdir()
    extra = (f"\n[program:{BYSTANDER}]\ncommand={sys.executable} {WITNESS} {witness_dir} 170\n"
             "autostart=true\nstartsecs=0\nstdout_logfile=NONE\nstderr_logfile=%(here)s/bystander.log\n")
    extra += listener_section(BIN / "celery-supervise", GRACE, project, name=LISTENER,
                              stdout_logfile="%(here)s/listener.stdout")
    (base / "host").mkdir()
    queue = f"drill-{uid}-{letter}"
    host = Host(base / "host", name, priority=200, extra=extra, project_dir=project, concurrency=1,
                broker_url=REDIS_URL, queues=f"{shared_queue},{queue}", node_prefix="drill", stopwaitsecs=10,
                env={"CELERY_SUPERVISE_LOCK": str(base / "reaper.lock")})
    host.extra_logs += ["listener.log", "bystander.log"]
    return host, project, witness_dir, queue


def test_drain_all_then_deploy_and_restart_host_by_host(tmp_path, real_procs):
    require(REDIS_URL)
    uid = uuid.uuid4().hex[:8]
    shared = f"drill-{uid}"
    markers = tmp_path / "markers"
    markers.mkdir()
    client = DemoClient(tmp_path / "unused-broker", markers, broker_url=REDIS_URL)
    drilled: list[Drilled] = []
    started = []
    try:
        for letter in "abc"[:HOSTS]:
            host, project, witness_dir, queue = start_host(tmp_path, uid, letter, shared)
            started.append(host)
            host.start()
            drilled.append(Drilled(host, project, None, queue))
        for d, witness_dir in zip(drilled, (tmp_path / letter / "bystander" for letter in "abc")):
            d.host.wait_nodes()
            wait_for(lambda: (witness_dir / "ready").exists(), 10, "the bystander's signal handlers")
            d.witness = Witness(d.host.host_process(d.host.group_pids(BYSTANDER)[BYSTANDER]), str(witness_dir))
        nodes = sorted(n for d in drilled for n in d.host.node_names())
        assert len(set(nodes)) == HOSTS, nodes  # one node name per host name

        # -- 1. drain --all from outside every host, with tasks running and waiting
        for d in drilled:
            d.learn_tree(real_procs)
            d.family(client, real_procs)
        sent = [client.mark(hold=1.0, queue=shared) for _ in range(MARKS_BEFORE_DRAIN)]
        wait_for(lambda: any(client.mark_record(t, "started") for t in sent), 30, "a mark task to start")
        outside = tmp_path / "outside"
        copy_project(outside)
        env = dict(drilled[0].host.env, CELERY_BROKER_URL=REDIS_URL)
        drained = json_output(celery_supervise("-A", "demo", "drain", "--all", "--drain-timeout", "30", "--json",
                                               cwd=outside, env=env))
        assert drained["drained"] is True, drained
        assert sorted(w["node"] for w in drained["workers"]) == nodes, drained
        # What was running finished; what waited stays in the broker for the deployed workers.
        running = [t for t in sent if client.mark_record(t, "started")]
        assert all(client.mark_record(t, "done") for t in running), "drain returned with a task still running"

        # -- 2. each host's deploy, one host at a time, inside the host
        for i, d in enumerate(drilled):
            others = {o.name: o.main()[1] for o in drilled if o is not d}
            old_ns, old = d.main()
            state = d.host.dir / "deploy-state.json"
            result = d.inside("-A", "demo", "deploy", "--no-shutdown", "-c", str(d.host.conf_path),
                              "--grace", str(GRACE), "--state", str(state), "--json")
            assert result.returncode == 0, f"{d.name}: stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            doc = json.loads(result.stdout)
            assert doc["exit_code"] == 0 and doc["problem"] is None and doc["shutdown"] is False, doc
            d.assert_reported_only_own(doc["kill"], "deploy")
            assert_reaped(d, doc["kill"], d.families[-1])
            d.assert_reported_only_own(listener_report(d, old_ns), "listener")
            assert_state_file_is_own(d, state)
            assert wait_gone([old], timeout=10) == []
            for name, main in others.items():  # the other hosts' workers were not touched
                assert main.is_running(), f"{d.name}'s deploy stopped {name}'s worker"
            d.host.wait_nodes()
            assert d.main()[0] != old_ns

        # -- 3. a restart host by host, while tasks arrive
        for d in drilled:
            d.learn_tree(real_procs)
            d.family(client, real_procs)
        for d in drilled:
            sent += [client.mark(hold=0.5, queue=shared) for _ in range(MARKS_PER_RESTART)]
            others = {o.name: o.main()[1] for o in drilled if o is not d}
            old_ns, old = d.main()
            state = d.host.dir / "restart-state.json"
            # ROLLING: issue 12's `restart --rolling` replaces this per-host loop once merged
            # (one `celery-supervise restart --rolling` per host, or across the fleet); keep
            # the assertions below for each host it restarts.
            result = d.inside("-A", "demo", "restart", PROGRAM, "-c", str(d.host.conf_path), "--grace", str(GRACE),
                              "--drain-timeout", "30", "--state", str(state), "--json")
            assert result.returncode == 0, f"{d.name}: stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            doc = json.loads(result.stdout)
            assert doc["exit_code"] == 0 and doc["problem"] is None, doc
            # Its JSON lists failures only; the listener's report of the old worker lists every process.
            assert doc["kill"]["summary"]["failed"] == doc["kill"]["summary"]["refused"] == 0, doc["kill"]
            report = listener_report(d, old_ns)
            d.assert_reported_only_own(report, "listener")
            assert_reaped(d, report, d.families[-1])
            assert_state_file_is_own(d, state)
            assert wait_gone([old], timeout=10) == []
            for name, main in others.items():
                assert main.is_running(), f"{d.name}'s restart stopped {name}'s worker"
            assert d.main()[0] != old_ns

        # -- what holds at the end
        wait_for(lambda: all(client.mark_record(t, "done") for t in sent), 60,
                 f"all {len(sent)} mark tasks to finish")
        for d in drilled:
            for family in d.families:
                assert wait_gone([family[r][1] for r in ATTACHED], timeout=5) == [], \
                    f"{d.name}: an attached leftover lives"
                assert [r for r in DETACHED if is_gone(family[r][1])] == [], f"{d.name}: a detached process died"
            d.learn_tree(real_procs)  # the worker running now, which the listener recorded last
            d.witness.assert_untouched(f"on {d.name}")
            assert d.host.init.is_running(), f"{d.name}'s PID 1 died"
            assert "received SIG" not in d.host.log(), d.host.log()
            assert_listener_records_are_own(d)
    finally:
        for host in reversed(started):
            host.stop()
        client.close()
        clean_redis(REDIS_URL, uid)
    assert real_procs.reap() == []


def assert_reaped(d, doc, family):
    """A kill document: the family's attached children killed or gone, the detached spared."""
    for role, (ns_pid, proc) in family.items():
        entry = next((p for p in doc["processes"]
                      if p["pid"] == ns_pid and abs(p["create_time"] - proc.create_time()) < 0.005), None)
        if role in DETACHED:
            assert entry is not None and entry["status"] == "spared", (d.name, role, doc)
        elif entry is not None:
            assert entry["status"] in ("killed", "gone"), (d.name, role, doc)
    assert doc["summary"]["failed"] == 0 and doc["summary"]["refused"] == 0, doc
    assert 1 not in {p["pid"] for p in doc["processes"]}, "PID 1 is in the kill's table"


def listener_report(d, old_ns):
    """The listener's report of its reap after the worker *old_ns* (PID inside) stopped."""
    pattern = f"{PROGRAM}_{PROGRAM}_0@{old_ns}.*.report.json"
    [path] = wait_for(lambda: list((d.host.dir / "state").glob(pattern)), 30, f"{d.name}'s listener report {pattern}")
    return json.loads(path.read_text())


def assert_state_file_is_own(d, path):
    doc = json.loads(path.read_text())
    assert doc["host"] == d.name, (d.name, doc["host"])
    assert [w["node"] for w in doc["workers"]] == d.host.node_names(), doc["workers"]
    foreign = [p for w in doc["workers"] for p in w["procs"] if not d.is_own(p["pid"], p["create_time"])]
    assert foreign == [], f"{d.name}'s state file records processes not its own: {foreign}"


def assert_listener_records_are_own(d):
    """The listener's records (of live workers) and reports (of its reaps): host name and processes its own."""
    docs = [json.loads(p.read_text()) for p in (d.host.dir / "state").glob("*.json")]
    records = [r for r in docs if "workers" in r]
    reports = [r for r in docs if "processes" in r]
    assert records and len(reports) >= 2, f"{d.name}: the listener kept {len(records)} record(s), {len(reports)} report(s)"
    for record in records:
        assert record["host"] == d.name, (d.name, record["host"])
        foreign = [p for w in record["workers"] for p in w["procs"] if not d.is_own(p["pid"], p["create_time"])]
        assert foreign == [], f"{d.name}'s listener recorded processes not its own: {foreign}"
    for report in reports:
        d.assert_reported_only_own(report, "listener")
