"""The audit log, against real kills of real processes that write down every signal they get.

The record's tree is made of signal witnesses (``tests/programs/signal_witness.py``)::

    main       witness, leads its process group   kill   SIGTERM (records it, exits)
    plain      witness in main's group           kill   SIGTERM (records it, exits)
    stubborn   witness in main's group, --stay   kill   SIGTERM (records it, stays), then SIGKILL
    detached   witness in a session of its own   spare  nothing

What a witness received is what it wrote down, plus SIGKILL when it died
of one (its exit status says so). The log must hold exactly those, each
with an intent line before its outcome line.
"""

import dataclasses
import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from celery_supervise.processes import audit as auditing, plan, snapshot, statefile
from celery_supervise.commands import audit as audit_cmd
from celery_supervise.processes.plan import Policy
from celery_supervise.processes.procs import MAIN, Proc, read_proc

from realprocs import wait_for

WITNESS = os.path.join(os.path.dirname(__file__), "programs", "signal_witness.py")
LIFETIME = "60"


def cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "celery_supervise", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


class Witnesses:
    def __init__(self, real_procs, folder):
        self.real_procs, self.folder, self.procs = real_procs, folder, {}

    def start(self, name, *extra, **popen):
        folder = self.folder / name
        folder.mkdir(parents=True)
        proc = self.real_procs.spawn([sys.executable, WITNESS, str(folder), LIFETIME, *extra], **popen)
        wait_for(lambda: (folder / "ready").exists() or proc.poll() is not None, 30, f"witness {name}")
        assert proc.poll() is None, f"witness {name} exited with {proc.returncode}"
        self.procs[name] = proc
        return proc

    def received(self, name) -> set[str]:
        """The signals witness *name* got: those it wrote down, and SIGKILL if it died of one."""
        proc = self.procs[name]
        try:
            got = set((self.folder / name / "signals").read_text().split())
        except FileNotFoundError:
            got = set()
        if proc.poll() is not None and proc.returncode == -9:
            got.add("SIGKILL")
        return got

    def wait_dead(self, *names):
        for name in names:
            self.procs[name].wait(10)


@pytest.fixture
def tree(real_procs, tmp_path):
    """The four witnesses of the module docstring, and a state file recording them."""
    w = Witnesses(real_procs, tmp_path / "witnesses")
    main = w.start("main", process_group=0)
    w.start("plain", process_group=main.pid)
    w.start("stubborn", "--stay", process_group=main.pid)
    w.start("detached", start_new_session=True)
    w.state = write_state(tmp_path / "state.json", [w.procs[n].pid for n in ("main", "plain", "stubborn", "detached")])
    return w


def write_state(path, pids):
    procs = [read_proc(pid) for pid in pids]
    main = procs[0].with_role(MAIN)
    worker = snapshot.Worker(main=main, procs=(main, *procs[1:]))
    snap = snapshot.take([worker], "test")
    statefile.write(str(path), statefile.to_document(snap, Policy(), plan.plan([worker], Policy())))
    return str(path)


def logged(path) -> list[dict]:
    lines, bad = auditing.read_lines(str(path))
    assert bad == 0
    return lines


# ------------------------------------------------------------- a real kill


def test_every_signal_a_real_kill_delivers_is_logged_and_nothing_else(tree, audit_log):
    res = cli("kill", tree.state, "--grace", "1", "--json")
    assert res.returncode == 0, res.stderr
    tree.wait_dead("main", "plain", "stubborn")
    doc = json.loads(res.stdout)
    assert doc["audit"]["written"] is True and doc["audit"]["path"] == str(audit_log)
    assert "audit" not in res.stderr

    lines = logged(audit_log)
    pids = {n: p.pid for n, p in tree.procs.items()}
    delivered: dict[int, set[str]] = {}
    for line in lines:
        if line["phase"] == auditing.OUTCOME and line["outcome"] == auditing.DELIVERED:
            delivered.setdefault(line["process"]["pid"], set()).add(line["signal"])
    for name, pid in pids.items():
        assert delivered.get(pid, set()) == tree.received(name), name
    assert tree.received("stubborn") == {"SIGTERM", "SIGKILL"}
    assert tree.received("detached") == set() and tree.procs["detached"].poll() is None
    # Nothing else: only the three targets appear, and every line is an intent or its outcome.
    assert {line["process"]["pid"] for line in lines} == {pids["main"], pids["plain"], pids["stubborn"]}
    runs = {line["run"] for line in lines}
    assert len(runs) == 1
    for i, line in enumerate(lines):
        if line["phase"] == auditing.OUTCOME:
            intents = [x for x in lines[:i] if x["phase"] == auditing.INTENT
                       and x["process"] == line["process"] and x["signal"] == line["signal"]]
            assert len(intents) == 1 and intents[0]["epoch"] <= line["epoch"]
    assert sum(x["phase"] == auditing.INTENT for x in lines) == sum(x["phase"] == auditing.OUTCOME for x in lines) == 4

    first = lines[0]
    assert first["command"]["verb"] == "kill" and tree.state in first["command"]["argv"]
    assert first["uid"] == os.getuid() and first["record"] == tree.state and first["by"] != os.getpid()
    assert first["time"].endswith("Z") and abs(first["epoch"] - os.stat(audit_log).st_mtime) < 60
    main_line = next(x for x in lines if x["process"]["pid"] == pids["main"])
    assert main_line["process"]["cmdline"][-2:] == [str(tree.folder / "main"), LIFETIME]
    assert main_line["reason"] == "worker main process"

    assert stat.S_IMODE(os.stat(audit_log).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(audit_log.parent).st_mode) == 0o700


def test_dry_run_logs_nothing(tree, audit_log):
    res = cli("kill", tree.state, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["audit"] is None
    assert not audit_log.exists() and not audit_log.parent.exists()
    assert all(tree.received(n) == set() for n in tree.procs)


def test_an_unwritable_log_never_blocks_the_kill(tree, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    env = {**os.environ, auditing.ENV: str(blocker / "audit.jsonl")}
    res = cli("kill", tree.state, "--grace", "1", "--json", env=env)
    assert res.returncode == 0, res.stderr
    tree.wait_dead("main", "plain", "stubborn")
    assert tree.received("stubborn") == {"SIGTERM", "SIGKILL"}
    doc = json.loads(res.stdout)
    assert doc["audit"]["written"] is False and "not-a-folder is not a folder" in doc["audit"]["error"]
    warnings = [line for line in res.stderr.splitlines() if "audit log" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: audit log not written:")


def test_the_global_option_overrides_the_environment(tree, tmp_path, audit_log):
    chosen = tmp_path / "chosen" / "log.jsonl"
    res = cli("--audit-log", str(chosen), "kill", tree.state, "--grace", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["audit"]["path"] == str(chosen)
    assert len(logged(chosen)) == 8 and not audit_log.exists()


def test_a_symlink_at_the_log_path_is_refused(tree, tmp_path, audit_log):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    audit_log.parent.mkdir(mode=0o700)
    audit_log.symlink_to(target)
    res = cli("kill", tree.state, "--grace", "1", "--json")
    assert res.returncode == 0, res.stderr
    tree.wait_dead("main", "plain", "stubborn")
    assert target.read_text() == "precious\n"
    doc = json.loads(res.stdout)
    assert doc["audit"]["written"] is False and "symlink" in doc["audit"]["error"]
    assert res.stderr.count("warning: audit log not written") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the log to another user")
def test_a_log_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "log" / "audit.jsonl"
    path.parent.mkdir(mode=0o700)
    path.write_text("")
    os.chown(path, 65534, 65534)
    log = auditing.AuditLog("kill", path=str(path))
    log.intend(15, [(fake_proc(4242), "test")])
    assert not log.written and "owned by uid 65534" in log.error
    assert path.read_text() == ""


def test_a_folder_others_can_write_is_refused(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    log = auditing.AuditLog("kill", path=str(folder / "audit.jsonl"))
    log.intend(15, [(fake_proc(4242), "test")])
    assert not log.written and "writable by other users" in log.error
    assert not (folder / "audit.jsonl").exists()


def test_a_fifo_at_the_log_path_neither_blocks_nor_is_written(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir(mode=0o700)
    os.mkfifo(folder / "audit.jsonl")
    log = auditing.AuditLog("kill", path=str(folder / "audit.jsonl"))
    log.intend(15, [(fake_proc(4242), "test")])  # would hang forever without O_NONBLOCK
    assert not log.written


def test_an_existing_log_is_made_0600(tmp_path):
    path = tmp_path / "log" / "audit.jsonl"
    path.parent.mkdir(mode=0o700)
    path.write_text("")
    path.chmod(0o644)
    log = auditing.AuditLog("kill", path=str(path))
    log.intend(15, [(fake_proc(4242), "test")])
    assert log.written and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_rotated_log_is_followed_by_a_new_one(real_procs, tmp_path, audit_log):
    """logrotate renames the file between two runs: the second run creates a new one."""
    first = Witnesses(real_procs, tmp_path / "first")
    first.start("main", process_group=0)
    state = write_state(tmp_path / "one.json", [first.procs["main"].pid])
    assert cli("kill", state, "--grace", "1").returncode == 0
    rotated = audit_log.with_name("audit.jsonl.1")
    os.rename(audit_log, rotated)
    second = Witnesses(real_procs, tmp_path / "second")
    second.start("main", process_group=0)
    state2 = write_state(tmp_path / "two.json", [second.procs["main"].pid])
    assert cli("kill", state2, "--grace", "1").returncode == 0
    old, new = logged(rotated), logged(audit_log)
    assert {x["process"]["pid"] for x in old} == {first.procs["main"].pid}
    assert {x["process"]["pid"] for x in new} == {second.procs["main"].pid}
    assert stat.S_IMODE(os.stat(audit_log).st_mode) == 0o600


def test_concurrent_writers_never_interleave_inside_a_line(tmp_path):
    path = tmp_path / "log" / "audit.jsonl"
    fat = fake_proc(7, cmdline=("x" * 3000,))  # lines far longer than PIPE_BUF

    logs = [auditing.AuditLog(f"w{n}", path=str(path)) for n in range(4)]

    def writer(n):
        for _ in range(40):
            logs[n].intend(15, [(fat, "r")] * 20)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [log.error for log in logs] == [None] * 4  # the first ones create the folder side by side
    lines = logged(path)
    assert len(lines) == 4 * 40 * 20


# ------------------------------------------------------------------ reading


def fake_proc(pid, create_time=1000.0, cmdline=("sleep", "60")):
    return Proc(pid=pid, ppid=1, create_time=create_time, pgid=pid, sid=pid, uid=0, cmdline=cmdline,
                sighup_ignored=False)


def test_the_reader_joins_filters_and_shows_unfinished_signals(tmp_path):
    path = tmp_path / "log" / "audit.jsonl"
    times = iter([100.0, 101.0, 200.0, 201.0, 5000.0])
    a = auditing.AuditLog("kill", path=str(path), record="/s.json", argv=["cs", "kill", "/s.json"],
                          clock=lambda: next(times))
    a.intend(15, [(fake_proc(10), "worker main process")])
    a.settle(15, [(fake_proc(10), "worker main process", auditing.DELIVERED)])
    a.intend(9, [(fake_proc(11), "attached to the worker")])
    a.settle(9, [(fake_proc(11), "attached to the worker", auditing.GONE)])
    b = auditing.AuditLog("listener", path=str(path), clock=lambda: next(times))
    b.intend(15, [(fake_proc(12), "warm stop")])  # its run died before the outcome
    with open(path, "a") as f:
        f.write('{"torn": \n')

    everything = audit_cmd.audit(str(path), clock=lambda: 6000.0)
    assert [(r.pid, r.signal, r.outcome) for r in everything.rows] == [
        (10, "SIGTERM", "delivered"), (11, "SIGKILL", "gone"), (12, "SIGTERM", None)]
    assert everything.warnings == [f"1 line(s) of {path} are not audit lines and were skipped"]
    assert [r.pid for r in audit_cmd.audit(str(path), pid=11).rows] == [11]
    assert [r.pid for r in audit_cmd.audit(str(path), since="1h", clock=lambda: 6000.0).rows] == [12]
    assert [r.pid for r in audit_cmd.audit(str(path), since="1970-01-01T00:04:00Z").rows] == [12]

    res = cli("--audit-log", str(path), "audit", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["unfinished"] == 1 and [s["verb"] for s in doc["signals"]] == ["kill", "kill", "listener"]
    table = cli("--audit-log", str(path), "audit", "--pid", "12", env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "no outcome" in table.stdout and "1 signal(s), 1 without an outcome" in table.stdout


def test_reading_a_missing_log_says_so(tmp_path):
    res = cli("--audit-log", str(tmp_path / "none.jsonl"), "audit")
    assert res.returncode == 0 and "0 signal(s)" in res.stdout and "no audit log at" in res.stderr


@pytest.mark.parametrize("text, expected", [
    ("30s", 970.0), ("10m", 400.0), ("2h", 1000.0 - 7200), ("1d", 1000.0 - 86400), ("1.5m", 910.0),
    ("1970-01-01T00:10:00Z", 600.0), ("1970-01-01T00:10:00", 600.0), ("1970-01-01T01:10:00+01:00", 600.0),
])
def test_since_accepts_ages_and_iso_times(text, expected):
    assert audit_cmd.parse_since(text, 1000.0) == expected


def test_a_bad_since_is_a_usage_error():
    res = cli("audit", "--since", "yesterday")
    assert res.returncode == 2 and "--since 'yesterday'" in res.stderr


def test_default_path_is_roots_or_the_users():
    assert auditing.default_path({}, euid=0) == "/var/log/celery-supervise/audit.jsonl"
    assert auditing.default_path({"XDG_STATE_HOME": "/x"}, euid=1000) == "/x/celery-supervise/audit.jsonl"
    assert auditing.default_path({auditing.ENV: "/y.jsonl"}, euid=0) == "/y.jsonl"
    assert auditing.default_path({}, euid=1000).endswith("/.local/state/celery-supervise/audit.jsonl")


def test_passwords_in_urls_on_the_command_line_are_not_logged(tmp_path):
    path = tmp_path / "log" / "audit.jsonl"
    log = auditing.AuditLog("restart", path=str(path), argv=["cs", "--supervisor-url", "http://admin:s3cret@h:9001"])
    log.intend(15, [(fake_proc(4242), "test")])
    (line,) = logged(path)
    assert line["command"]["argv"] == ["cs", "--supervisor-url", "http://admin:***@h:9001"]
    assert "s3cret" not in path.read_text()


def test_manage_py_celery_audit_reads_the_same_log(tmp_path):
    """The Django command gets the verb from the CLI's click tree; the log from CELERY_SUPERVISE_AUDIT_LOG."""
    from realsupervisor import DJANGO_APP

    path = tmp_path / "log" / "audit.jsonl"
    log = auditing.AuditLog("kill", path=str(path))
    log.intend(15, [(fake_proc(4242), "attached to the worker")])
    log.settle(15, [(fake_proc(4242), "attached to the worker", auditing.DELIVERED)])
    res = subprocess.run([sys.executable, "manage.py", "celery", "audit", "--pid", "4242", "--json"], cwd=DJANGO_APP,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                         env={**os.environ, auditing.ENV: str(path), "CELERY_SUPERVISE_BROKER_DIR": str(tmp_path / "b")})
    assert res.returncode == 0, res.stderr
    [row] = json.loads(res.stdout)["signals"]
    assert (row["pid"], row["signal"], row["outcome"]) == (4242, "SIGTERM", "delivered")
