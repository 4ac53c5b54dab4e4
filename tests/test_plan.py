"""Table-driven tests of the verdict rules, on hand-written trees.

Nothing here touches a process: the plan is a pure function of data.
"""

import pytest

from celery_supervise.errors import UsageError
from celery_supervise.plan import KILL, REFUSE, SPARE, Policy, plan
from celery_supervise.procs import MAIN, POOL, TASK, Proc
from celery_supervise.snapshot import Worker

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
