"""Nothing attached escapes: children that left the tree and the process group.

Each escape route starts, from a real task of a real worker under a real
supervisord, three ``sleep`` processes that are no longer below the worker
and no longer in its process group (``demo.tasks.spawn_escapes``)::

    1000 celery worker (main)          kill    worker main process
    ├── 1001 pool                      kill    pool process
    └── 1002 pool                      kill    pool process
    PID 1 (or the nearest subreaper)
    ├── 1010 sleep  .1  own pgid       kill    attached: escaped (in the worker's cgroup)
    ├── 1011 sleep  .2  own session    spare   own session
    └── 1012 sleep  .3  own pgid, nohup spare  nohup

Only the worker's cgroup still finds them. Every supervisord here runs in
a cgroup of the test's own, so that the worker cgroups are nested in it and
the test can prove that none is left behind; another program of the same
supervisord (same session) with a child in a group of its own is never
taken for an escaped child.
"""

import json
import os
import uuid

import psutil
import pytest

from celery_supervise.celery_side import discovery
from celery_supervise.processes import cgroups
from realprocs import wait_for, wait_gone
from realsupervisor import BIN, PROGRAM, Supervisord, copy_project, listener_section
from taskfamily import celery_supervise, json_output, outcomes, recorded_verdicts

pytestmark = pytest.mark.e2e

LISTENER = "celery-supervise"
GRACE = 3
STOP_TIMEOUT = 60
WORKER = f"{PROGRAM}:{PROGRAM}_0"
# Another program of the same supervisord: same session as the worker, with
# a child in a process group of its own (job control), in no worker's tree.
BYSTANDER = """
[program:bystander]
command=bash -c "set -m; sleep 301 & wait"
autostart=true
; the test's cleanup kills it before supervisord stops: it must not come back
autorestart=false
startsecs=0
stopasgroup=false
"""
ESCAPED = "attached: escaped the tree and process group (in the worker's cgroup)"


def _mount():
    found = cgroups.mount()
    if found is None or found[1] or os.geteuid() != 0:
        return None
    return found[0]


@pytest.fixture
def test_cgroup():
    """A cgroup of this test's own, under which supervisord runs; nothing may be left in it.

    At teardown (after every supervisord is gone) it must hold no worker
    cgroup: each was removed by the kill that reaped its worker. Whatever is
    still there is emptied and removed anyway, and the test fails.
    """
    root = _mount()
    if root is None:
        pytest.skip("needs root and a writable cgroup v2 mount")
    path = f"/cs-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(root + path)
    yield path
    left = []
    for folder, dirs, _ in os.walk(root + path, topdown=False):
        rel = folder[len(root):]
        if cgroups.worker_cgroup(rel):
            left.append(rel)
        try:
            pids = open(os.path.join(folder, "cgroup.procs")).read().split()
        except OSError:
            pids = []
        for pid in pids:  # the leak guard reaps them; out of the way first
            try:
                with open(os.path.join(root, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass
        try:
            os.rmdir(folder)
        except OSError as exc:
            left.append(f"{rel} ({exc})")
    assert left == [], f"cgroups left behind: {left}"


class ContainedSupervisord(Supervisord):
    """supervisord started inside *cgroup* (the shell moves itself there, then execs it)."""

    def __init__(self, directory, cgroup, contain=False, wrap=None, **options):
        super().__init__(directory, **options)
        self.cgroup = cgroup
        if wrap:  # the worker's program runs `sh -c "WRAP; exec celery …"`: a wrapper that execs it later
            head, rest = self.conf_path.read_text().split("\ncommand=", 1)
            line, tail = rest.split("\n", 1)
            self.conf_path.write_text(f'{head}\ncommand=sh -c "{wrap}; exec {line}"\n{tail}')
        if contain:
            text = self.conf_path.read_text()
            celery = text.split("\ncommand=", 1)[1].split(" ", 1)[0]
            self.conf_path.write_text(text.replace(f"\ncommand={celery} ",
                                                   f"\ncommand={BIN / 'celery-supervise'} contain -- {celery} ", 1))

    def command(self):
        procs_file = f"{_mount()}{self.cgroup}/cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs_file} && exec "$@"', "sh", *super().command()]


@pytest.fixture
def contained(test_cgroup, tmp_path):
    """Factory: supervisord in the test's cgroup, with the bystander program; stopped at teardown."""
    started = []
    project = copy_project(tmp_path / "project")

    def start(listener=False, contain=False, env=None, **options):
        extra = BYSTANDER
        if listener:
            extra += listener_section(BIN / "celery-supervise", GRACE, project, name=LISTENER)
        options.setdefault("stopwaitsecs", 2)
        env = {"CELERY_SUPERVISE_LOCK": str(tmp_path / "reaper.lock"), **(env or {})}
        directory = tmp_path / f"supervisor{len(started)}"
        directory.mkdir()
        run = ContainedSupervisord(directory, test_cgroup, contain=contain, priority=200, extra=extra, env=env,
                                   project_dir=project, **options)
        run.extra_logs.append("listener.log")
        started.append(run)
        run.start()
        run.wait_ready()
        return run

    yield start
    for run in reversed(started):
        run.stop()


def listener_log(run):
    path = run.dir / "listener.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def escape(run, real_procs, route, **kwargs):
    """Run ``spawn_escapes`` by *route*; its three children (tracked), by variant."""
    task_id = run.celery.app.send_task("demo.tasks.spawn_escapes", kwargs={
        "marker_dir": str(run.marker_dir), "route": route, "lifetime": 120, **kwargs}).id
    marker = run.celery.wait_for_marker(task_id, timeout=60)
    kids = marker["children"]
    procs = dict(zip(kids, real_procs.track(*kids.values())))
    assert len(procs) == 3, marker
    return marker, procs


def bystander_procs(run, real_procs):
    shell = psutil.Process(run.group_pids("bystander")["bystander"])
    kids = wait_for(lambda: shell.children(), 20, "the bystander's sleep")
    return real_procs.track(shell, *kids)


def check_escaped(run, procs, main_pid):
    """Each child left the tree and the group; the setsid'd one has a session of its own."""
    main = psutil.Process(main_pid)
    below = {p.pid for p in main.children(recursive=True)}
    for variant, p in procs.items():
        assert p.pid not in below, (variant, p)
        assert os.getpgid(p.pid) != main.pid, (variant, p)
    assert os.getsid(procs["attached"].pid) == os.getsid(procs["nohup"].pid) == os.getsid(main_pid)
    assert os.getsid(procs["setsid"].pid) != os.getsid(main_pid)


def worker_cgroup_dirs(run):
    base = f"{_mount()}{run.cgroup}/{cgroups.BASE_NAME}"
    if not os.path.isdir(base):
        return []
    return sorted(n for n in os.listdir(base) if n != cgroups.DETACHED and os.path.isdir(os.path.join(base, n)))


def in_detached(run, pid):
    return cgroups.path_of(pid) == f"{run.cgroup}/{cgroups.BASE_NAME}/{cgroups.DETACHED}"


def assert_reaped(run, procs, bystanders):
    assert wait_gone([procs["attached"]], STOP_TIMEOUT) == [], run.diagnostics()
    for variant in ("setsid", "nohup"):
        assert procs[variant].is_running(), variant
        # Moved once the kill's last wait is over, just after the attached one died.
        wait_for(lambda: in_detached(run, procs[variant].pid), 20, f"the {variant} child to be moved to detached")
    for p in bystanders:
        assert p.is_running(), p
        assert cgroups.worker_cgroup(cgroups.path_of(p.pid) or "") is None, p


# --------------------------------------------------------------------- tests


def test_listener_catches_every_escape_route(contained, real_procs):
    """Double fork + setpgid, Popen(process_group=0), `set -m`: the listener's reap kills the attached ones."""
    run = contained(listener=True)
    bystanders = bystander_procs(run, real_procs)
    # Restarted once the listener runs: placed at PROCESS_STATE_STARTING, not late.
    assert run.ctl("restart", WORKER).returncode == 0
    run.wait_ready()
    main_pid = run.group_pids()[f"{PROGRAM}_0"]
    real_procs.track(main_pid)
    wait_for(lambda: cgroups.of_worker(main_pid)[0], 20, "the worker to be placed in its cgroup")
    cg = cgroups.of_worker(main_pid)[0]
    assert not cg.late, cg
    assert cg.path.startswith(f"{run.cgroup}/{cgroups.BASE_NAME}/{WORKER}@"), cg

    escaped = {}
    for route in ("double_fork", "process_group", "job_control"):
        _, escaped[route] = escape(run, real_procs, route)
        check_escaped(run, escaped[route], main_pid)

    env, cwd = run.env, run.project_dir
    status = json_output(celery_supervise("-A", "demo", "status", "--json", cwd=cwd, env=env))
    [worker] = status["workers"]
    assert worker["containment"] == f"cgroup {cg.path}", worker
    verdicts = recorded_verdicts(status)
    for route, procs in escaped.items():
        assert verdicts[procs["attached"].pid] == ("kill", ESCAPED), (route, verdicts)
        assert verdicts[procs["setsid"].pid] == ("spare", "own session"), (route, verdicts)
        assert verdicts[procs["nohup"].pid] == ("spare", "nohup"), (route, verdicts)
    assert not {p.pid for p in bystanders} & set(verdicts), verdicts
    text = celery_supervise("-A", "demo", "status", cwd=cwd, env=env)
    assert f"main {main_pid}: cgroup {cg.path}" in text.stdout, text.stdout

    assert run.ctl("stop", WORKER).returncode == 0
    for route, procs in escaped.items():
        assert_reaped(run, procs, bystanders)
    wait_for(lambda: not worker_cgroup_dirs(run), 20, "the worker's cgroup to be removed")
    reaped = [e for e in listener_log(run) if e["action"] == "reaped"]
    assert reaped, listener_log(run)
    killed = {pid for e in reaped for pid in e["killed"]}
    assert {procs["attached"].pid for procs in escaped.values()} <= killed, reaped


def test_contain_wrapper_savepid_and_kill(contained, real_procs, tmp_path):
    """`contain` places the worker before its first instruction; savepid and kill (CLI) see the members."""
    run = contained(contain=True)
    bystanders = bystander_procs(run, real_procs)
    main_pid = run.group_pids()[f"{PROGRAM}_0"]
    real_procs.track(main_pid)
    cg = cgroups.of_worker(main_pid)[0]
    assert cg is not None and not cg.late, cgroups.path_of(main_pid)
    env, cwd = run.env, run.project_dir

    _, before = escape(run, real_procs, "double_fork")  # before savepid: no record holds it
    state = tmp_path / "state.json"
    saved = json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=cwd, env=env))
    assert len(saved["workers"]) == 1, saved
    record = json.loads(state.read_text())
    [worker] = record["workers"]
    assert worker["cgroup"] == {"path": cg.path, "inode": cg.inode, "late": False}, worker
    verdicts = recorded_verdicts(record)
    assert verdicts[before["attached"].pid] == ("kill", ESCAPED), verdicts
    _, after = escape(run, real_procs, "process_group")  # after savepid: only the cgroup knows it

    assert run.ctl("stop", WORKER).returncode == 0
    killed = json_output(celery_supervise("-A", "demo", "kill", str(state), "--grace", "3", "--json",
                                          cwd=cwd, env=env))
    by_pid = outcomes(killed)
    for procs in (before, after):
        assert by_pid[procs["attached"].pid]["status"] == "killed", by_pid
        assert by_pid[procs["setsid"].pid]["status"] == "spared", by_pid
        assert by_pid[procs["nohup"].pid]["status"] == "spared", by_pid
        assert_reaped(run, procs, bystanders)
    assert not {p.pid for p in bystanders} & set(by_pid), by_pid
    assert worker_cgroup_dirs(run) == []


def test_max_tasks_per_child_replaced_pool_children(contained, real_procs):
    """A pool process replaced after its task (--max-tasks-per-child=1) leaves its children re-parented."""
    run = contained(listener=True, queues="celery --max-tasks-per-child=1")
    bystanders = bystander_procs(run, real_procs)
    main_pid = run.group_pids()[f"{PROGRAM}_0"]
    real_procs.track(main_pid)
    wait_for(lambda: cgroups.of_worker(main_pid)[0], 30, "the worker to be placed in its cgroup")
    marker, procs = escape(run, real_procs, "pool_child")
    wait_for(lambda: not psutil.pid_exists(marker["pool_pid"]), 30, "the pool process to be replaced")
    check_escaped(run, procs, main_pid)

    assert run.ctl("stop", WORKER).returncode == 0
    assert_reaped(run, procs, bystanders)
    wait_for(lambda: not worker_cgroup_dirs(run), 20, "the worker's cgroup to be removed")


def test_without_cgroups_the_process_group_is_all_and_says_so(contained, real_procs, tmp_path):
    """No listener, no wrapper (or --cgroups off): status says so, and kill behaves as before."""
    run = contained()
    bystander_procs(run, real_procs)
    main_pid = run.group_pids()[f"{PROGRAM}_0"]
    real_procs.track(main_pid)
    env, cwd = run.env, run.project_dir
    status = json_output(celery_supervise("-A", "demo", "status", "--json", cwd=cwd, env=env))
    assert status["workers"][0]["containment"] == f"process group only: {cgroups.NOT_PLACED}", status
    off = json_output(celery_supervise("-A", "demo", "status", "--json", "--cgroups", "off", cwd=cwd, env=env))
    assert off["workers"][0]["containment"] == "process group only: off (--cgroups off)", off
    text = celery_supervise("-A", "demo", "status", "--cgroups", "off", cwd=cwd, env=env)
    assert f"main {main_pid}: process group only: off (--cgroups off)" in text.stdout, text.stdout
    bad = celery_supervise("-A", "demo", "status", "--cgroups", "maybe", cwd=cwd, env=env)
    assert bad.returncode == 2, bad

    _, procs = escape(run, real_procs, "double_fork")
    state = tmp_path / "state.json"
    json_output(celery_supervise("-A", "demo", "savepid", str(state), "--json", cwd=cwd, env=env))
    assert run.ctl("stop", WORKER).returncode == 0
    killed = json_output(celery_supervise("-A", "demo", "kill", str(state), "--grace", "3", "--json",
                                          cwd=cwd, env=env))
    # As before this mechanism: what left the tree and the group is not found (the documented gap).
    assert not {p.pid for p in procs.values()} & set(outcomes(killed)), outcomes(killed)
    assert all(p.is_running() for p in procs.values())
    assert worker_cgroup_dirs(run) == []


def test_autoscale_shrink_leaves_pool_children_re_parented(contained, real_procs):
    """``--autoscale=2,1`` grows for two tasks, then shrinks: the removed pool process's children escape.

    Each task (``pool_child``) starts its three children from its own pool
    process and holds it 3 s, so the second task makes the autoscaler grow
    the pool to two; once both are idle for ``AUTOSCALE_KEEPALIVE`` (1 s
    here) it shrinks back to one, terminating one pool process (billiard
    picks an idle one: either). That pool process's children are then
    re-parented out of the tree and are in no process group of the worker:
    only the worker's cgroup still holds them. The stop's reap kills the
    attached ones, of both tasks, and spares the detached ones.
    """
    run = contained(listener=True, concurrency=1, queues="celery --autoscale=2,1",
                    env={"AUTOSCALE_KEEPALIVE": "1"})
    bystanders = bystander_procs(run, real_procs)
    main_pid = run.group_pids()[f"{PROGRAM}_0"]
    real_procs.track(main_pid)
    wait_for(lambda: cgroups.of_worker(main_pid)[0], 30, "the worker to be placed in its cgroup")
    ids = [run.celery.app.send_task("demo.tasks.spawn_escapes", kwargs={
        "marker_dir": str(run.marker_dir), "route": "pool_child", "lifetime": 120, "hold": 3}).id for _ in range(2)]
    markers = [run.celery.wait_for_marker(i, timeout=60) for i in ids]
    pools = {m["pool_pid"] for m in markers}
    assert len(pools) == 2, f"the autoscaler did not grow the pool: both tasks ran in {pools}"
    families = [dict(zip(m["children"], real_procs.track(*m["children"].values()))) for m in markers]
    gone = wait_for(lambda: [m for m in markers if not psutil.pid_exists(m["pool_pid"])], 60,
                    "the autoscaler to shrink the pool")
    assert len(gone) == 1, gone
    escaped = families[markers.index(gone[0])]
    check_escaped(run, escaped, main_pid)

    assert run.ctl("stop", WORKER).returncode == 0
    for procs in families:
        assert_reaped(run, procs, bystanders)
    wait_for(lambda: not worker_cgroup_dirs(run), 20, "the worker's cgroup to be removed")
    # The kill removes the cgroup before the listener writes its report and its "reaped" line.
    wait_for(lambda: escaped["attached"].pid in {pid for e in listener_log(run) if e["action"] == "reaped"
                                                 for pid in e["killed"]}, 20, "the listener's reaped line")


def test_a_worker_its_wrapper_execs_after_running_is_recorded_once_it_has(contained, real_procs):
    """``sh -c "sleep 3; exec celery … worker"``: RUNNING (startsecs=1) names the shell, not a worker yet.

    The listener cannot record a shell; it looks at that PID again every
    0.25 s (``supervisord.watching.Pending``) and records the worker once the
    exec has happened, not at the next TICK_60 a minute later. Restarted
    once the listener runs, so that the RUNNING event is the one it handles.
    """
    run = contained(listener=True, wrap="sleep 3")
    bystander_procs(run, real_procs)
    assert run.ctl("restart", WORKER).returncode == 0
    shell_pid = run.group_pids()[f"{PROGRAM}_0"]
    assert psutil.Process(shell_pid).name() == "sh"
    real_procs.track(shell_pid)

    def recorded():
        return [e for e in listener_log(run) if e["action"] == "recorded" and e["pid"] == shell_pid]
    # Well before a TICK_60 could have caught it; the why says which path recorded it.
    line = wait_for(recorded, 20, "the listener's record of the exec'd worker")[0]
    assert line["why"] == "PROCESS_STATE_RUNNING (exec'd since)", line
    assert discovery.parse_worker_cmdline(psutil.Process(shell_pid).cmdline()) is not None
    assert run.ctl("stop", WORKER).returncode == 0
    wait_for(lambda: any(e["action"] == "reaped" for e in listener_log(run)), 20, "the listener's reap")
    wait_for(lambda: not worker_cgroup_dirs(run), 20, "the worker's cgroup to be removed")
