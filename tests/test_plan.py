"""Table-driven tests of the verdict rules, on hand-written trees.

Nothing here touches a process: the plan is a pure function of data.
"""

import pytest

from celery_supervise.errors import UsageError
from celery_supervise.processes.plan import KILL, REFUSE, SPARE, Policy, orphans, plan
from celery_supervise.processes.procs import MAIN, POOL, TASK, Proc
from celery_supervise.processes.snapshot import Worker

WORKER_SID = 500  # supervisord's session
WORKER_PGID = 1000  # supervisord makes each program a group leader
CELERY = ("/venv/bin/python", "/venv/bin/celery", "-A", "demo", "worker")


def proc(pid, ppid, role=TASK, *, sid=WORKER_SID, pgid=WORKER_PGID, hup=False, cmd=("sleep", "60")):
    return Proc(pid=pid, ppid=ppid, create_time=float(pid), pgid=pgid, sid=sid, uid=0,
                cmdline=CELERY if role in (MAIN, POOL) else cmd, sighup_ignored=hup, role=role)


def worker(*rest, main_hup=False):
    main = proc(1000, 500, MAIN, hup=main_hup)
    return Worker(main=main, procs=(main, *rest))


def verdicts(w, policy=Policy(), protected={}):
    return {v.proc.pid: (v.action, v.reason) for v in plan([w], policy, protected)}


STANDARD = worker(
    proc(1001, 1000, POOL),
    proc(1010, 1001),
    proc(1011, 1001, hup=True),
    proc(1012, 1001, sid=1012, pgid=1012),
    proc(1002, 1000, POOL),
)
"""
1000 celery worker (main)          kill
├── 1001 pool                      kill
│   ├── 1010 sleep                 kill    attached
│   ├── 1011 nohup sleep           spare   ignores SIGHUP
│   └── 1012 setsid sleep          spare   own session
└── 1002 pool                      kill
"""


@pytest.mark.parametrize(
    "policy, expected",
    [
        (
            Policy(),
            {1000: KILL, 1001: KILL, 1010: KILL, 1011: SPARE, 1012: SPARE, 1002: KILL},
        ),
        (
            Policy.parse("setsid"),
            {1000: KILL, 1001: KILL, 1010: KILL, 1011: KILL, 1012: SPARE, 1002: KILL},
        ),
        (
            Policy.parse("nohup"),
            {1000: KILL, 1001: KILL, 1010: KILL, 1011: SPARE, 1012: KILL, 1002: KILL},
        ),
        (
            Policy.parse("none"),
            {1000: KILL, 1001: KILL, 1010: KILL, 1011: KILL, 1012: KILL, 1002: KILL},
        ),
    ],
    ids=["default", "setsid-only", "nohup-only", "none"],
)
def test_standard_tree(policy, expected):
    got = verdicts(STANDARD, policy)
    assert {pid: action for pid, (action, _) in got.items()} == expected


@pytest.mark.parametrize(
    "name, tree, pid, policy, action, reason",
    [
        # 1000 main ── 1001 pool
        ("main", worker(proc(1001, 1000, POOL)), 1000, Policy(), KILL, "worker main process"),
        ("pool", worker(proc(1001, 1000, POOL)), 1001, Policy(), KILL, "pool process"),
        # 1000 main ── 1001 pool ── 1010 sleep (attached)
        ("attached child", worker(proc(1001, 1000, POOL), proc(1010, 1001)), 1010, Policy(), KILL,
         "attached to the worker"),
        # 1000 main ── 1001 pool ── 1011 nohup sleep
        ("nohup", worker(proc(1001, 1000, POOL), proc(1011, 1001, hup=True)), 1011, Policy(), SPARE, "nohup"),
        # 1000 main ── 1001 pool ── 1012 setsid sleep
        ("setsid", worker(proc(1001, 1000, POOL), proc(1012, 1001, sid=1012, pgid=1012)), 1012, Policy(),
         SPARE, "own session"),
        # 1000 main ── 1001 pool ── 1012 setsid sh ── 1013 sleep (same new session)
        ("setsid grandchild",
         worker(proc(1001, 1000, POOL), proc(1012, 1001, sid=1012, pgid=1012), proc(1013, 1012, sid=1012, pgid=1012)),
         1013, Policy(), SPARE, "child of spared 1012"),
        # 1000 main ── 1001 pool ── 1010 sh ── 1020 sleep (attached grandchild)
        ("attached grandchild", worker(proc(1001, 1000, POOL), proc(1010, 1001), proc(1020, 1010)), 1020, Policy(),
         KILL, "attached to the worker"),
        # 1000 main (under nohup itself) ── 1001 pool ── 1011 sleep: inherits
        # the ignored SIGHUP from its pool, so it is not a deliberate nohup.
        ("inherited sighup",
         worker(proc(1001, 1000, POOL, hup=True), proc(1011, 1001, hup=True), main_hup=True),
         1011, Policy(), KILL, "attached to the worker"),
        # 1000 main ── 1001 pool ── 1014 sleep in its own process group (setpgid)
        ("own pgroup, default policy", worker(proc(1001, 1000, POOL), proc(1014, 1001, pgid=1014)), 1014, Policy(),
         KILL, "attached to the worker"),
        ("own pgroup, pgroup policy", worker(proc(1001, 1000, POOL), proc(1014, 1001, pgid=1014)), 1014,
         Policy.parse("setsid,nohup,pgroup"), SPARE, "own process group"),
        # 1000 main; 1030 sleep re-parented to PID 1 after its pool died,
        # still in the worker's process group (found by the group scan).
        ("orphan", worker(proc(1030, 1)), 1030, Policy(), KILL, "attached orphan of the worker"),
        ("nohup orphan", worker(proc(1030, 1, hup=True)), 1030, Policy(), SPARE, "nohup"),
        # 1000 main ── 1001 pool; supervisord's PID somehow in the tree
        ("protected", worker(proc(1001, 1000, POOL)), 1001, Policy(), REFUSE, "supervisord"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_rule(name, tree, pid, policy, action, reason):
    protected = {1001: "supervisord"} if name == "protected" else {}
    assert verdicts(tree, policy, protected)[pid] == (action, reason)


def test_every_process_gets_exactly_one_verdict():
    got = plan([STANDARD, worker(proc(1001, 1000, POOL))], Policy())
    assert len(got) == len(STANDARD.procs) + 2
    assert all(v.reason for v in got)


@pytest.mark.parametrize(
    "text, rules",
    [
        (None, {"setsid", "nohup"}),
        ("setsid,nohup", {"setsid", "nohup"}),
        ("setsid", {"setsid"}),
        ("none", set()),
        ("NOHUP, setsid ,pgroup", {"setsid", "nohup", "pgroup"}),
    ],
)
def test_policy_parse(text, rules):
    assert Policy.parse(text).spare == rules


@pytest.mark.parametrize("text", ["", "bogus", "setsid,bogus", "none,setsid"])
def test_policy_parse_rejects(text):
    with pytest.raises(UsageError):
        Policy.parse(text)


# ------------------------------------------------ containers: supervisord is PID 1

CONTAINER_SID = 1  # supervisord as a container's PID 1 leads the session every program is in


def cproc(pid, ppid, pgid, *, sid=CONTAINER_SID, role=TASK, hup=False, cmd=("sleep", "60")):
    return Proc(pid=pid, ppid=ppid, create_time=float(pid), pgid=pgid, sid=sid, uid=0,
                cmdline=CELERY if role in (MAIN, POOL) else cmd, sighup_ignored=hup, role=role)


#: The recorded worker main, stopped since: its PID is free (``holder`` None).
CMAIN = cproc(100, 1, 100, role=MAIN)

#: What runs in the container once the worker has stopped::
#:
#:     1 supervisord                          protected (PID 1), never in a tree
#:     ├── 50 celery worker (other program)    pgid 50    not adopted: its own group
#:     │   └── 51 pool                         pgid 50    not adopted
#:     ├── 60 sleep (bystander program)        pgid 60    not adopted: its own group
#:     │   └── 61 sh                           pgid 60    not adopted
#:     ├── 130 sleep                           pgid 100   adopted: the worker's orphan (task child)
#:     ├── 131 nohup sleep                     pgid 100   adopted (and spared: nohup)
#:     ├── 132 sh -c … (setsid)                pgid 132   not adopted: own session (recorded before, if at all)
#:     └── 90 sleep, born before the worker    pgid 100   not adopted (cannot be its child)
CONTAINER = [
    cproc(50, 1, 50, role=MAIN), cproc(51, 50, 50, role=POOL),
    cproc(60, 1, 60), cproc(61, 60, 60, cmd=("sh",)),
    cproc(130, 1, 100), cproc(131, 1, 100, hup=True), cproc(132, 1, 132, sid=132),
    cproc(90, 1, 100),
]


@pytest.mark.parametrize(
    "name, main, holder, known, adopted",
    [
        ("stopped worker: its orphans only", CMAIN, None, (), [130, 131]),
        ("already in the tree", CMAIN, None, (130,), [131]),
        ("the worker still runs (the same process)", CMAIN, CMAIN.create_time, (), [130, 131]),
        # Its PID now names another process: the group died out, 100 is somebody else's.
        ("worker PID recycled", CMAIN, 555.0, (), []),
        # Not a group leader: the group is shared with whoever started it.
        ("not a group leader", cproc(100, 1, 1, role=MAIN), None, (), []),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_orphans_in_a_container(name, main, holder, known, adopted):
    assert [p.pid for p in orphans(main, holder, CONTAINER, known)] == adopted


@pytest.mark.parametrize("init", ["supervisord", "tini"])
def test_orphans_of_a_stopped_worker_below_pid_1(init):
    """An orphan's new parent is PID 1 (supervisord itself, or tini): protected, but not its ancestor here.

    1 supervisord or tini (protected)     not in the tree
    (2 supervisord, under tini)           not in the tree
    100 celery worker (main)              gone, still the record's main
    ├── 130 sleep         ppid 1          kill    attached orphan of the worker
    └── 131 nohup sleep   ppid 1          spare   nohup
    """
    protected = {1: "PID 1"} if init == "supervisord" else {1: "PID 1", 2: "supervisord"}
    found = orphans(CMAIN, None, CONTAINER)
    tree = Worker(main=CMAIN, procs=(CMAIN, *found))
    assert verdicts(tree, protected=protected) == {
        100: (KILL, "worker main process"),
        130: (KILL, "attached orphan of the worker"),
        131: (SPARE, "nohup"),
    }


def test_below_means_reached_down_the_tree_from_a_protected_process():
    """A record that somehow holds supervisord brings its programs along: all refused.

    100 celery worker (main)
    └── 101 pool
        └── 1 supervisord (protected)     refuse  PID 1
            └── 60 sleep (a program)      refuse  below 1 (PID 1)
    """
    main = cproc(100, 0, 100, role=MAIN)
    tree = Worker(main=main, procs=(main, cproc(101, 100, 100, role=POOL), cproc(1, 101, 1), cproc(60, 1, 60)))
    got = verdicts(tree, protected={1: "PID 1"})
    assert got[1] == (REFUSE, "PID 1") and got[60] == (REFUSE, "below 1 (PID 1)")
