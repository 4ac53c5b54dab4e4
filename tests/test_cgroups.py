"""Table tests of the pure parts of cgroup tracking (celery_supervise.processes.cgroups).

What membership changes in the plan is tested here on hand-written trees;
that the kernel keeps every escape route in the cgroup is proven with real
processes in tests/test_e2e_escapes.py.
"""

import io

import pytest

from celery_supervise.processes import cgroups
from celery_supervise.processes.cgroups import Cgroup
from celery_supervise.commands import contain as containing, print_config as printing
from celery_supervise.errors import UsageError
from celery_supervise.processes.plan import Policy, plan
from celery_supervise.processes.procs import MAIN, POOL, TASK, Proc
from celery_supervise.processes.snapshot import Worker

HYBRID = """\
24 23 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
25 24 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
26 24 0:24 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
"""
PURE = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
READ_ONLY = "30 23 0:26 / /sys/fs/cgroup ro,nosuid,relatime shared:4 - cgroup2 cgroup2 rw\n"
V1_ONLY = "26 24 0:24 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory\n"


@pytest.mark.parametrize("text, expected", [
    (HYBRID, ("/sys/fs/cgroup/unified", False)),
    (PURE, ("/sys/fs/cgroup", False)),
    (READ_ONLY, ("/sys/fs/cgroup", True)),
    (V1_ONLY, None),
    ("", None),
    ("garbage without a separator\n", None),
])
def test_v2_mount(text, expected):
    assert cgroups.v2_mount(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("0::/\n", "/"),
    ("9:name=systemd:/\n4:memory:/x\n0::/system.slice/supervisor.service\n", "/system.slice/supervisor.service"),
    ("4:memory:/x\n", None),  # v1 only
    ("0::/../../other\n", "/../../other"),  # outside our cgroup namespace: place() refuses it
])
def test_v2_path(text, expected):
    assert cgroups.v2_path(text) == expected


@pytest.mark.parametrize("path, expected", [
    ("/celery-supervise/w@12.345", "/celery-supervise/w@12.345"),
    ("/s.service/celery-supervise/grp:w_0@12.345.late", "/s.service/celery-supervise/grp:w_0@12.345.late"),
    ("/s.service/celery-supervise/detached", None),
    ("/s.service/celery-supervise", None),
    ("/s.service/other/w@12.345", None),  # not under our base: never taken for a worker's
    ("/celery-supervise/w@12", None),
    ("/", None),
])
def test_worker_cgroup(path, expected):
    assert cgroups.worker_cgroup(path) == expected


@pytest.mark.parametrize("program, late, expected", [
    ("celery-worker", False, "celery-worker@42.777"),
    ("grp:w_00", True, "grp:w_00@42.777.late"),
    ("we/ird name", False, "we_ird_name@42.777"),  # never a path separator
])
def test_cgroup_name(program, late, expected):
    assert cgroups.cgroup_name(program, 42, 777, late) == expected
    assert cgroups.worker_cgroup("/celery-supervise/" + expected)


@pytest.mark.parametrize("parent, expected", [
    ("/", "/celery-supervise"),
    ("/system.slice/supervisor.service", "/system.slice/supervisor.service/celery-supervise"),
    ("/x/celery-supervise/w@1.2", "/x/celery-supervise"),  # a contained process placing another
    ("/x/celery-supervise", "/x/celery-supervise"),
])
def test_base_of(parent, expected):
    assert cgroups.base_of(parent) == expected


@pytest.mark.parametrize("value", [
    None, "x", {"path": "/celery-supervise/w@1.2"}, {"path": "/elsewhere/w@1.2", "inode": 5},
    {"path": "/celery-supervise/w@1.2", "inode": True}, {"path": "/celery-supervise/w@1.2", "inode": 0},
    {"path": 3, "inode": 5},
])
def test_a_malformed_recorded_cgroup_is_never_trusted(value):
    assert Cgroup.from_dict(value) is None


def test_recorded_cgroup_round_trip():
    cg = Cgroup("/s/celery-supervise/w@1.2.late", 77, True)
    assert Cgroup.from_dict(cg.to_dict()) == cg


@pytest.mark.parametrize("cgroup, reason, expected", [
    (Cgroup("/celery-supervise/w@1.2", 7), None, "cgroup /celery-supervise/w@1.2"),
    (Cgroup("/celery-supervise/w@1.2.late", 7, True), None,
     "cgroup /celery-supervise/w@1.2.late (placed late: children forked before that are not covered)"),
    (None, "off (--cgroups off)", "process group only: off (--cgroups off)"),
    (None, None, f"process group only: {cgroups.NOT_PLACED}"),
])
def test_describe(cgroup, reason, expected):
    assert cgroups.describe(cgroup, reason) == expected


# ------------------------------------------------------------- into the plan

SID = 500
CELERY = ("/venv/bin/celery", "-A", "demo", "worker")


def proc(pid, ppid, role=TASK, *, sid=SID, pgid=1000, hup=False, born=None):
    return Proc(pid=pid, ppid=ppid, create_time=float(pid if born is None else born), pgid=pgid, sid=sid, uid=0,
                cmdline=CELERY if role in (MAIN, POOL) else ("sleep", "60"), sighup_ignored=hup, role=role)


MAIN_PROC = proc(1000, 1, MAIN)


def test_escaped_skips_known_the_main_and_older_processes():
    """A wrapper shell the program ran without exec is in the cgroup too, born before the main: never escaped."""
    wrapper = proc(999, 1, born=999.0)
    members = [wrapper, MAIN_PROC, proc(1001, 1000, POOL), proc(1010, 1, pgid=1010)]
    assert [p.pid for p in cgroups.escaped(MAIN_PROC, members, known={1001})] == [1010]


def test_plan_on_escaped_members():
    """Members the cgroup added, after the tree and the group scan::

        1000 celery worker (main)            kill    worker main process
        └── 1001 pool                        kill    pool process
        PID 1
        ├── 1010 sleep  own pgid             kill    attached: escaped (in the worker's cgroup)
        │   └── 1020 sleep                   kill    attached to the worker
        ├── 1011 sleep  own pgid, nohup      spare   nohup
        ├── 1012 sleep  own session          spare   own session
        └── 1013 sleep  worker's pgid        kill    attached orphan of the worker
    """
    w = Worker(main=MAIN_PROC, procs=(
        MAIN_PROC, proc(1001, 1000, POOL),
        proc(1010, 1, pgid=1010), proc(1011, 1, pgid=1011, hup=True), proc(1012, 1, sid=1012, pgid=1012),
        proc(1013, 1), proc(1020, 1010, pgid=1010),
    ))
    got = {v.proc.pid: (v.action, v.reason) for v in plan([w], Policy())}
    assert got == {
        1000: ("kill", "worker main process"),
        1001: ("kill", "pool process"),
        1010: ("kill", "attached: escaped the tree and process group (in the worker's cgroup)"),
        1011: ("spare", "nohup"),
        1012: ("spare", "own session"),
        1013: ("kill", "attached orphan of the worker"),
        1020: ("kill", "attached to the worker"),
    }
    # --spare setsid,nohup,pgroup: leaving the group is then enough to be spared.
    wide = {v.proc.pid: v.action for v in plan([w], Policy.parse("setsid,nohup,pgroup"))}
    assert wide[1010] == "spare" and wide[1020] == "spare"


# ------------------------------------------------------------------ contain


@pytest.mark.parametrize("environ, expected", [
    ({"SUPERVISOR_PROCESS_NAME": "w", "SUPERVISOR_GROUP_NAME": "w"}, "w"),
    ({"SUPERVISOR_PROCESS_NAME": "w_00", "SUPERVISOR_GROUP_NAME": "w"}, "w:w_00"),
    ({}, "contained"),
])
def test_program_name(environ, expected):
    assert containing.program_name(environ) == expected


def test_contain_off_execs_at_once_and_says_why():
    ran, err = [], io.StringIO()
    line = containing.contain(["celery", "-A", "demo", "worker"], cgroups.OFF, environ={},
                              execvp=lambda f, argv: ran.append(argv), err=err)
    assert ran == [["celery", "-A", "demo", "worker"]]
    assert line == "process group only: off (--cgroups off)"
    assert err.getvalue() == "celery-supervise contain: process group only: off (--cgroups off)\n"


@pytest.mark.parametrize("argv, mode", [([], cgroups.AUTO), (["celery"], "maybe")])
def test_contain_refuses_bad_input(argv, mode):
    with pytest.raises(UsageError):
        containing.contain(argv, mode, execvp=lambda f, a: None, err=io.StringIO())


def test_print_config_contain_wraps_the_worker_only():
    request = printing.Request(app="demo", contain=True)
    sections, _ = printing.plan(request, executable="/venv/bin/python", cwd="/srv")
    worker, listener = ({s.key: s.value for s in sec.settings} for sec in sections)
    assert worker["command"].startswith("/venv/bin/celery-supervise contain -- /venv/bin/celery -A demo worker")
    assert "contain" not in listener["command"]
    assert printing.invocation(request).endswith("print-config --contain")


def test_place_refuses_pid_1_and_the_parent_itself():
    """Checked before anything is read or written: a worker cgroup holding PID 1 or supervisord would own everything."""
    if cgroups.unavailable() is not None:
        pytest.skip("no cgroup v2 mount")
    for pid, parent in ((1, 4242), (4242, 4242)):
        with pytest.raises(cgroups.CgroupUnavailable, match="never placed"):
            cgroups.place(pid, "w", parent_pid=parent)
