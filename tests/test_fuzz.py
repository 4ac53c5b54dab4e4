"""Fuzzed state files and listener input: a result or our own error, never a crash, never a signal.

Two inputs come from outside the tool's control: the state file that
``kill``/``requeue`` read (and the listener reads back from its folder), and
what supervisord writes to the listener's stdin. Hypothesis generates both:

* state files as raw bytes, as arbitrary JSON, as old-style PID lists, and
  as structurally valid documents that name real processes (a signal
  witness started by the test, pytest itself, pytest's parent) with
  creation times that are wrong, plus PIDs that cannot exist, then mutated
  at random places;
* listener streams of header lines and payloads, well-formed or not.

The properties: reading gives a record that passes the documented checks,
or a :class:`SuperviseError`; planning, a dry run, a real kill (when every
PID the record names is one of ours; see :func:`safe_to_act`), rendering
and ``requeue --dry-run`` never raise anything else; the listener never
dies and writes nothing but the protocol; and the witness receives no
signal. ``tests/programs/signal_witness.py`` writes down every catchable
signal, so a SIGTERM sent and then "forgiven" still shows.

Fast by default (a few dozen examples). For a long fuzz::

    CELERY_SUPERVISE_FUZZ_SCALE=50 .venv/bin/pytest tests/test_fuzz.py

multiplies every ``max_examples`` by 50.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace

import psutil
import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st
from rich.console import Console

from celery_supervise import render as report
from celery_supervise.commands import kill as kill_cmd
from celery_supervise.commands import requeue as requeue_cmd
from celery_supervise.processes import procs, snapshot, statefile
from celery_supervise.errors import SuperviseError
from celery_supervise.processes.kill import KILLED, WOULD_KILL
from celery_supervise.listener import Listener, parse_payload
from celery_supervise.processes.plan import Policy, plan

from realprocs import HANDSHAKE_TIMEOUT, wait_for

FUZZ_SCALE = max(1, int(os.environ.get("CELERY_SUPERVISE_FUZZ_SCALE", "1")))
WITNESS = os.path.join(os.path.dirname(__file__), "programs", "signal_witness.py")
#: Linux never hands out a PID above PID_MAX_LIMIT (2^22 on 64-bit), whatever pid_max says.
NO_SUCH_PID = 4_194_305
#: An app no worker on this host runs: legacy PID lists then never match a colleague's worker.
NO_APP = "celery_supervise_fuzz_no_such_app"


def fuzz_settings(examples: int, **kw):
    return settings(
        max_examples=examples * FUZZ_SCALE,
        deadline=None,
        # The witness is started once per test, on purpose, and shared by its examples.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.large_base_example],
        **kw,
    )


# ------------------------------------------------------------------ witness


@dataclass
class Witness:
    proc: psutil.Popen
    folder: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signals(self) -> str:
        try:
            with open(os.path.join(self.folder, "signals")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def assert_untouched(self, context=""):
        assert self.signals() == "", f"the witness received {self.signals().split()} {context}"
        assert self.proc.is_running() and self.proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED), \
            f"the witness is gone or stopped {context}"


@pytest.fixture
def witness(real_procs, tmp_path):
    """A process leading its own group, writing down every signal it gets."""
    folder = tmp_path / "witness"
    folder.mkdir()
    proc = real_procs.spawn([sys.executable, WITNESS, str(folder), "120"], process_group=0)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the witness exited with {proc.returncode}")
        return (folder / "ready").exists()

    wait_for(ready, HANDSHAKE_TIMEOUT, "the witness's handlers")
    return Witness(proc, str(folder))


@pytest.fixture
def private_lock(tmp_path, monkeypatch):
    """A reaper lock of our own: never wait on, or block, a colleague's kill."""
    path = str(tmp_path / "reaper.lock")
    monkeypatch.setenv("CELERY_SUPERVISE_LOCK", path)
    return path


# ---------------------------------------------------------------- templates
#
# Real PIDs and creation times are only known once the witness runs, but
# regression examples (@example) are written before. So the strategies
# build templates with symbolic references, and render() fills them in.


@dataclass(frozen=True)
class Pid:
    """The PID of ``witness``, ``self`` (pytest), ``parent`` (pytest's parent) or ``absent`` number *n*."""

    who: str
    n: int = 0


@dataclass(frozen=True)
class CreateTime:
    """*who*'s real creation time plus *offset* (for ``absent``: *offset* itself)."""

    who: str
    offset: float = 0.0


@dataclass(frozen=True)
class Host:
    pass


@dataclass(frozen=True)
class BootTime:
    offset: float = 0.0


@dataclass(frozen=True)
class Nested:
    """A list nested *depth* deep (filled in late: hypothesis would recurse printing it)."""

    depth: int


@dataclass(frozen=True)
class Legacy:
    """An old-style file: PIDs separated by *sep*."""

    pids: tuple
    sep: str = " "


@dataclass(frozen=True)
class Env:
    identities: dict  # who -> (pid, create_time)
    host: str
    boot_time: float

    @classmethod
    def of(cls, witness: Witness) -> "Env":
        ids = {}
        for who, pid in (("witness", witness.pid), ("self", os.getpid()), ("parent", os.getppid())):
            ids[who] = (pid, procs.read_proc(pid).create_time)
        return cls(ids, snapshot.hostname(), procs.boot_time())

    def pid(self, ref: Pid) -> int:
        return NO_SUCH_PID + ref.n if ref.who == "absent" else self.identities[ref.who][0]


def fill(value, env: Env):
    if isinstance(value, Pid):
        return env.pid(value)
    if isinstance(value, CreateTime):
        return value.offset if value.who == "absent" else env.identities[value.who][1] + value.offset
    if isinstance(value, Host):
        return env.host
    if isinstance(value, BootTime):
        return env.boot_time + value.offset
    if isinstance(value, Nested):
        return json.loads(nested(value.depth))
    if isinstance(value, dict):
        return {k: fill(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, env) for v in value]
    return value


def render(template, env: Env) -> bytes:
    if isinstance(template, bytes):
        return template
    if isinstance(template, Legacy):
        return template.sep.join(str(fill(p, env)) for p in template.pids).encode()
    return json.dumps(fill(template, env)).encode()  # NaN and Infinity included, as json.loads reads them


# --------------------------------------------------------------- strategies

# Strings that have bitten renderers and parsers: rich markup, control
# characters, line separators, terminal escapes, surrogate-ish text.
NASTY_TEXT = st.sampled_from(["[/]", "[/x]", "[bold]", "\n", "\r\n", "\u2028", "\x1b[31m", "\x00", "", " ", "?",
                              "None", "celery", "worker", "-A", "é", "\udcff"])
TEXT = st.one_of(st.text(max_size=12), NASTY_TEXT)
NUMBER = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0, 1, -1, 2**63, 10**30, float("nan"), float("inf")]))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON = st.recursive(SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                   st.dictionaries(TEXT, kids, max_size=4)), max_leaves=12)

WHO = st.sampled_from(["witness", "self", "parent", "absent"])
PID = st.builds(Pid, WHO, st.integers(0, 5))
# The witness is only ever named with a creation time that is not its own:
# with its own, killing it would be the right answer.
FINITE_WRONG_OFFSET = st.one_of(st.sampled_from([-1e9, -3600.0, -1.0, -0.011, 0.011, 1.0, 3600.0]),
                                st.floats(min_value=0.01, max_value=1e6), st.floats(max_value=-0.01, min_value=-1e6))
WRONG_OFFSET = st.one_of(FINITE_WRONG_OFFSET, FINITE_WRONG_OFFSET, FINITE_WRONG_OFFSET,
                         st.sampled_from([float("nan"), float("inf"), float("-inf")]))


@st.composite
def create_time_for(draw, pid: Pid):
    if pid.who == "witness":
        return CreateTime("witness", draw(WRONG_OFFSET))
    if pid.who == "absent":
        return CreateTime("absent", draw(st.floats(0, 2e9)))
    # pytest and its parent may carry their true creation time: they are protected anyway.
    return CreateTime(pid.who, draw(st.one_of(st.just(0.0), WRONG_OFFSET)))


@st.composite
def proc_template(draw, role: str):
    pid = draw(PID)
    return {
        "pid": pid,
        "ppid": draw(st.one_of(PID, st.integers(0, 10**6))),
        "create_time": draw(create_time_for(pid)),
        "pgid": draw(st.one_of(st.just(pid), PID)),
        "sid": draw(st.one_of(st.integers(0, 10**6), PID)),
        "uid": draw(st.integers(-1, 70000)),
        "cmdline": draw(st.lists(TEXT, max_size=4)),
        "sighup_ignored": draw(st.booleans()),
        "role": role,
    }


@st.composite
def task_template(draw):
    return {
        "id": draw(st.one_of(TEXT, st.uuids().map(str))),
        "name": draw(TEXT),
        "args": draw(st.one_of(st.lists(JSON, max_size=3), JSON)),
        "kwargs": draw(st.one_of(st.dictionaries(TEXT, JSON, max_size=3), JSON)),
        "delivery_info": draw(st.one_of(
            st.fixed_dictionaries({"exchange": TEXT, "routing_key": TEXT},
                                  optional={"queue": TEXT, "priority": SCALAR}), JSON)),
        "worker_pid": draw(SCALAR),
        "acknowledged": draw(st.one_of(st.booleans(), st.none(), SCALAR)),
        "time_start": draw(st.one_of(NUMBER, st.none())),
    }


@st.composite
def worker_template(draw):
    main = draw(proc_template("main"))
    rest = draw(st.lists(st.sampled_from(["pool", "task"]).flatmap(proc_template), max_size=3))
    return {
        "node": draw(st.one_of(st.none(), TEXT)),
        "app": draw(st.one_of(st.none(), TEXT)),
        "program": draw(st.one_of(st.none(), TEXT)),
        "supervisor_pid": draw(st.one_of(st.none(), PID)),
        "main": main["pid"],
        "procs": [main, *rest],
        "tasks": draw(st.lists(task_template(), max_size=2)),
    }


POLICY = st.sampled_from([None, "setsid,nohup", "none", "setsid", "nohup", "setsid,nohup,pgroup"])


@st.composite
def document_template(draw):
    return {
        "schema": 1,
        "kind": statefile.KIND,
        "host": Host(),
        "boot_time": BootTime(draw(st.one_of(st.floats(-1.5, 1.5), st.just(0.0)))),
        "taken_at": draw(st.one_of(st.floats(0, 2e9), st.floats(0, 2e9), NUMBER)),
        "source": draw(st.sampled_from(["control", "scan", "listener", "supervisor"])),
        "policy": draw(st.one_of(POLICY, POLICY, POLICY, SCALAR)),
        "warnings": draw(st.lists(TEXT, max_size=2)),
        "workers": draw(st.lists(worker_template(), min_size=draw(st.sampled_from([0, 1, 1])), max_size=3)),
        "verdicts": draw(st.one_of(st.just([]), st.just([]), JSON)),
    }


def _paths(value, at=()):
    """Every place in a JSON-like template, as a tuple of keys and indexes."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*at, i))


def _mutate(doc, path, how, new):
    """*doc* with the value at *path* replaced by *new*, or deleted."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    if rest:
        copy[head] = _mutate(doc[head], rest, how, new)
    elif how == "delete":
        del copy[head]
    else:
        copy[head] = new
    return copy


@st.composite
def mutated(draw, base):
    doc = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["delete", "replace"])) if path else "replace"
        doc = _mutate(doc, path, how, draw(JSON) if how == "replace" else None)
    return doc


STATE_FILES = st.one_of(
    st.binary(max_size=200),
    JSON,
    st.builds(Legacy, st.lists(st.one_of(PID, st.integers(0, 10**6)), max_size=4).map(tuple),
              st.sampled_from([" ", "\n", "\t", "  "])),
    document_template(),
    document_template(),
    mutated(document_template()),
)


# --------------------------------------------------------------- properties


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def read_state(path: str, env: Env):
    """statefile.read, which must return a record or raise our own error."""
    try:
        return statefile.read(path, host=env.host, boot_time=env.boot_time, boot_id=procs.boot_id())
    except SuperviseError as exc:
        assert "\n" not in str(exc)
        return exc


def assert_trustworthy(record, env: Env):
    """What an accepted record must satisfy, whatever the file said."""
    if isinstance(record, statefile.LegacyRecord):
        assert all(isinstance(p, int) and p > 1 for p in record.pids)
        return
    snap = record.snapshot
    assert math.isfinite(snap.boot_time) and abs(snap.boot_time - env.boot_time) <= statefile.BOOT_TIME_TOLERANCE
    assert math.isfinite(snap.taken_at)
    for w in snap.workers:
        assert w.procs[0] is w.main and w.main.role == "main"
        for p in w.procs:
            assert isinstance(p.pid, int) and p.pid > 1 and math.isfinite(p.create_time)


def safe_to_act(record, env: Env) -> bool:
    """Whether a real kill of *record* can only ever touch our own test processes.

    Random PIDs could name a colleague's processes on this shared machine,
    and the tool *should* kill a recorded worker's leftovers; so a real
    kill runs only when every PID in the record is the witness (under a
    creation time that is not its own), pytest, pytest's parent, or a PID
    that cannot exist. Everything else gets the dry run only.
    """
    ours = {pid for pid, _ in env.identities.values()}
    if isinstance(record, statefile.LegacyRecord):
        return all(p in ours or p >= NO_SUCH_PID for p in record.pids)
    witness_pid, witness_ct = env.identities["witness"]
    for w in record.snapshot.workers:
        for p in w.procs:
            if not (p.pid in ours or p.pid >= NO_SUCH_PID):
                return False
            if p.pid == witness_pid and p.same_process(witness_ct):
                return False
    return True


def render_everything(result) -> None:
    """Render a result both ways, as the CLI would; must not raise."""
    sink = io.StringIO()
    out, err = Console(file=sink, width=160), Console(file=sink, width=160)
    if isinstance(result, requeue_cmd.RequeueResult):
        report.render_requeue(out, err, result, True)
        report.render_requeue(out, err, result, False)
    else:
        report.render_kill(out, err, result, True)
        report.render_kill(out, err, result, False)


def assert_never_kills(result, env: Env, witness: Witness):
    never = {env.identities["self"][0], env.identities["parent"][0], witness.pid}
    marked = [(o.proc.pid, o.status, o.reason) for o in result.outcomes
              if o.proc.pid in never and o.status in (KILLED, WOULD_KILL)]
    assert not marked, f"would signal our own processes: {marked}"


def celery_app():
    from celery import Celery

    return Celery("fuzz", broker="memory://", set_as_current=False)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Regression examples: each one crashed, or was accepted, before its fix.
NAN_BOOT = {"schema": 1, "kind": statefile.KIND, "host": Host(), "boot_time": float("nan"), "taken_at": 1.0,
            "policy": "setsid,nohup", "workers": []}
NAN_TAKEN_AT = {**NAN_BOOT, "boot_time": BootTime(), "taken_at": float("nan")}
HUGE_TAKEN_AT = {**NAN_TAKEN_AT, "taken_at": 10**400}  # float() of it overflows
MARKUP_CMDLINE = {**NAN_TAKEN_AT, "taken_at": 1.0, "workers": [{
    "main": Pid("absent"), "procs": [{"pid": Pid("absent"), "ppid": 1, "create_time": 1.0, "pgid": Pid("absent"),
                                      "sid": 1, "uid": 0, "cmdline": ["sleep", "[/]"], "role": "main"}]}]}
TASK_MARKUP = {**MARKUP_CMDLINE, "source": "control", "workers": [{
    **MARKUP_CMDLINE["workers"][0],
    "tasks": [{"id": "[/x]", "name": "[/]", "args": [], "kwargs": {},
               "delivery_info": {"exchange": "", "routing_key": "[/]"}}]}]}
# pytest (an ancestor of the tool, or the tool itself) recorded with its true
# identity: its children, the witness among them, were planned as "attached".
PROTECTED_PARENT = {**MARKUP_CMDLINE, "policy": "none", "workers": [{
    "main": Pid("absent"), "procs": [
        {"pid": Pid("absent"), "ppid": 1, "create_time": 1.0, "pgid": Pid("absent"), "sid": 1, "uid": 0,
         "cmdline": [], "role": "main"},
        {"pid": Pid("self"), "ppid": Pid("parent"), "create_time": CreateTime("self"), "pgid": 2, "sid": 2,
         "uid": 0, "cmdline": [], "role": "task"}]}]}
# Found by this fuzz: the recorded main (the witness, under a creation time
# not its own) is refused, but the walk below the live "pool" (pytest
# itself) found the witness again under that PID, and revisit() took it for
# the main: planned first, before its protected parent, it came out "would
# kill, attached to the worker".
RECYCLED_MAIN_BELOW_SELF = {**MARKUP_CMDLINE, "policy": None, "workers": [{
    "main": Pid("witness"), "procs": [
        {"pid": Pid("witness"), "ppid": 0, "create_time": CreateTime("witness", -1e9), "pgid": Pid("witness"),
         "sid": 0, "uid": 0, "cmdline": [], "sighup_ignored": False, "role": "main"},
        {"pid": Pid("self"), "ppid": 0, "create_time": CreateTime("self"), "pgid": Pid("self"), "sid": 0,
         "uid": 0, "cmdline": [], "sighup_ignored": False, "role": "pool"}]}]}
DEEP_ARGS = {**TASK_MARKUP, "workers": [{**TASK_MARKUP["workers"][0], "tasks": [{
    "id": "t1", "name": "t", "args": Nested(900), "kwargs": {},
    "delivery_info": {"exchange": "", "routing_key": "celery"}}]}]}


@fuzz_settings(100)
@given(template=STATE_FILES)
@example(template=NAN_BOOT)
@example(template=NAN_TAKEN_AT)
@example(template=HUGE_TAKEN_AT)
@example(template=nested(100_000))
@example(template=b"1" * 5000)
@example(template=MARKUP_CMDLINE)
@example(template=TASK_MARKUP)
@example(template=PROTECTED_PARENT)
@example(template=RECYCLED_MAIN_BELOW_SELF)
@example(template=DEEP_ARGS)
@example(template=Legacy((Pid("self"), Pid("parent"), Pid("witness"))))
def test_fuzzed_state_file_is_read_or_refused_and_never_signals(template, witness, tmp_path, private_lock):
    env = Env.of(witness)
    data = render(template, env)
    path = str(tmp_path / "state.json")
    write_file(path, data)
    # Same folder every example: an earlier example's requeue ledger would be read as this one's.
    if os.path.exists(path + ".requeued"):
        os.unlink(path + ".requeued")

    record = read_state(path, env)
    event(f"read: {type(record).__name__}")
    if not isinstance(record, SuperviseError):
        assert_trustworthy(record, env)

    # The kill's whole path (read, re-verify, plan, dry run), then the report.
    try:
        dry = kill_cmd.kill(path, grace=0, dry_run=True, app_spec=NO_APP)
    except SuperviseError:
        assert isinstance(record, SuperviseError)
    else:
        assert not isinstance(record, SuperviseError)
        assert_never_kills(dry, env, witness)
        render_everything(dry)

    if not isinstance(record, SuperviseError) and safe_to_act(record, env):
        real = kill_cmd.kill(path, grace=0, app_spec=NO_APP)
        event("real kill: " + ", ".join(sorted({o.status for o in real.outcomes})))
        assert_never_kills(real, env, witness)
        render_everything(real)

    # requeue --dry-run reads the same file and decides on its tasks.
    try:
        result = requeue_cmd.requeue(path, celery_app(), dry_run=True)
    except SuperviseError:
        pass
    else:
        render_everything(result)

    witness.assert_untouched(f"after {data[:300]!r}")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "celery_supervise", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=env)


@fuzz_settings(8)
@given(template=STATE_FILES)
@example(template=nested(100_000))
@example(template=MARKUP_CMDLINE)
@example(template=PROTECTED_PARENT)
def test_fuzzed_state_file_through_the_cli(template, witness, tmp_path, private_lock):
    """``celery-supervise kill FILE`` in a subprocess: a documented exit code, one line on error."""
    env = Env.of(witness)
    data = render(template, env)
    path = str(tmp_path / "state.json")
    write_file(path, data)
    record = read_state(path, env)
    act = not isinstance(record, SuperviseError) and safe_to_act(record, env)
    res = cli("-A", NO_APP, "kill", path, "--grace", "0", *([] if act else ["--dry-run"]),
              env={**os.environ, "CELERY_SUPERVISE_LOCK": private_lock})
    context = f"for {data[:300]!r}: exit {res.returncode}, stderr {res.stderr!r}"
    assert res.returncode in (0, 1, 2, 3), context
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, context
    if res.returncode != 0:
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("celery-supervise: error: "), context
        assert res.stdout == "", context
        assert isinstance(record, SuperviseError), context
    witness.assert_untouched(context)


# ------------------------------------------------------------- the listener

EVENTS = st.sampled_from([
    "PROCESS_STATE_RUNNING", "PROCESS_STATE_STOPPING", "PROCESS_STATE_STOPPED", "PROCESS_STATE_EXITED",
    "PROCESS_STATE_BACKOFF", "PROCESS_STATE_FATAL", "PROCESS_STATE_STARTING", "PROCESS_STATE_UNKNOWN",
    "TICK_5", "TICK_60", "SUPERVISOR_STATE_CHANGE_RUNNING", "SUPERVISOR_STATE_CHANGE_STOPPING",
    "REMOTE_COMMUNICATION", "PROCESS_LOG_STDOUT", "",
])
TOKEN = st.text(st.characters(blacklist_characters=" \t\n\r\x0b\x0c:", blacklist_categories=("Cs",)),
                min_size=1, max_size=8)
LOOSE = st.text(max_size=20)


#: Placeholders in listener payloads for the PIDs of real processes.
PLACEHOLDERS = {"{pid}": Pid("witness"), "{self}": Pid("self"), "{parent}": Pid("parent"), "{absent}": Pid("absent")}


def subst(text: str, env: Env) -> str:
    for placeholder, ref in PLACEHOLDERS.items():
        text = text.replace(placeholder, str(env.pid(ref)))
    return text


@st.composite
def payload_text(draw):
    """A PROCESS_STATE-like payload: mostly key:value tokens, sometimes anything."""
    fields = {
        "processname": draw(st.one_of(st.just("fuzz"), TOKEN)),
        "groupname": draw(st.one_of(st.just("fuzz"), TOKEN)),
        "from_state": draw(st.one_of(st.just("RUNNING"), TOKEN)),
        "pid": draw(st.one_of(st.sampled_from(list(PLACEHOLDERS)), st.integers(-5, 10**7).map(str), TOKEN)),
        "expected": draw(st.sampled_from(["0", "1"])),
    }
    keys = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
    tokens = [f"{k}:{fields[k]}" for k in keys]
    tokens += draw(st.lists(st.one_of(TOKEN, LOOSE), max_size=2))
    body = draw(st.one_of(st.just(""), st.just("\n"), LOOSE.map(lambda s: "\n" + s)))
    return " ".join(tokens) + body


@dataclass(frozen=True)
class Frame:
    """One event on the listener's stdin; *length* ``None`` means the payload's true byte count."""

    eventname: str
    payload: str  # with PLACEHOLDERS for real PIDs
    length: object = None  # None, or an int/str to put in the header as is
    extra: str = ""  # more header tokens, or garbage

    def encode(self, env: Env) -> bytes:
        payload = subst(self.payload, env).encode("utf-8", "surrogatepass")
        length = len(payload) if self.length is None else self.length
        header = (f"ver:3.0 server:supervisor serial:1 pool:fuzz poolserial:1 eventname:{self.eventname} "
                  f"len:{length}{self.extra}\n")
        return header.encode("utf-8", "surrogatepass") + payload


@st.composite
def frame(draw):
    length = draw(st.one_of(st.none(), st.none(), st.integers(-3, 400), st.integers(2**62, 2**80),
                            st.sampled_from(["", "x", "1e3", "٣", "-0", " 5"])))
    extra = draw(st.one_of(st.just(""), st.just(""), LOOSE.map(lambda s: " " + s)))
    return Frame(draw(EVENTS), draw(payload_text()), length, extra)


STREAMS = st.one_of(
    st.lists(frame(), max_size=6),
    st.binary(max_size=200),
    st.lists(st.one_of(frame(), st.binary(max_size=40)), max_size=5),
)


def render_stream(stream, env: Env) -> bytes:
    if isinstance(stream, bytes):
        return stream
    return b"".join(item.encode(env) if isinstance(item, Frame) else item for item in stream)


def seeded_listener(tmp_path, witness: Witness, stdin: bytes) -> Listener:
    """A listener whose folder holds a record of the witness under a creation time not its own.

    The record says its supervisord is dead (a PID that cannot exist), so a
    sweep takes it for an orphan: the warm stop and the kill both meet the
    witness, and must both notice it is not the process recorded.
    """
    state = tmp_path / "listener"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o700)
    live = snapshot.read_worker(witness.pid, program="fuzz")
    main = replace(live.main, create_time=live.main.create_time + 1.0)
    worker = snapshot.Worker(main=main, procs=(main,), program="fuzz")
    doc = statefile.to_document(snapshot.take([worker], "listener"), Policy(), plan([worker], Policy()))
    doc["supervisor"] = {"pid": NO_SUCH_PID, "create_time": 1.0}
    statefile.write(str(state / f"fuzz@{witness.pid}.json"), doc)
    stdin_stream = io.TextIOWrapper(io.BytesIO(stdin))
    listener = Listener(state_dir=str(state), grace=0, app_spec=NO_APP, stdin=stdin_stream,
                        stdout=io.StringIO(), stderr=io.StringIO(), clock=lambda: 1000.0, wait=False)
    listener._input = stdin_stream.buffer
    return listener


@fuzz_settings(40)
@given(stream=STREAMS)
@example(stream=[Frame("TICK_60", "when:1", length=-1), Frame("TICK_60", "when:1")])
@example(stream=[Frame("TICK_60", "when:1", length=2**80), Frame("TICK_60", "when:1")])
@example(stream=[Frame("TICK_60", "when:1", length=2**62)])
@example(stream=[Frame("PROCESS_STATE_STOPPED", "processname:fuzz groupname:fuzz from_state:STOPPING pid:{pid}")])
def test_fuzzed_listener_input_is_acknowledged_and_never_signals(stream, witness, tmp_path, private_lock):
    env = Env.of(witness)
    data = render_stream(stream, env)
    listener = seeded_listener(tmp_path, witness, data)
    assert listener.run() == 0
    out = listener.stdout.getvalue()
    # stdout is nothing but the protocol: READY, then RESULT 2 OK and READY per event.
    assert out.startswith("READY\n") and out[len("READY\n"):] == "RESULT 2\nOKREADY\n" * out.count("RESULT 2\nOK"), out
    for line in listener.stderr.getvalue().splitlines():
        assert isinstance(json.loads(line), dict)
    if isinstance(stream, list) and all(isinstance(f, Frame) and f.length is None and f.eventname and not f.extra
                                         for f in stream):
        # Well-framed events: every one is acknowledged, none swallows the next.
        assert out.count("RESULT 2\nOK") == len(stream), (out, listener.stderr.getvalue())
    witness.assert_untouched(f"after {data[:300]!r}")


@fuzz_settings(40)
@given(eventname=st.one_of(EVENTS, LOOSE), payload=st.one_of(payload_text(), LOOSE),
       extra=st.dictionaries(TOKEN, LOOSE, max_size=3))
def test_fuzzed_event_is_handled_or_logged_never_raised(eventname, payload, extra, witness, tmp_path, private_lock):
    """handle_event directly, on a folder that holds a record naming the witness."""
    env = Env.of(witness)
    listener = seeded_listener(tmp_path, witness, b"")
    headers = {**extra, "eventname": eventname}
    listener.handle_event(headers, subst(payload, env))
    assert listener.stdout.getvalue() == ""
    for line in listener.stderr.getvalue().splitlines():
        assert isinstance(json.loads(line), dict)
    witness.assert_untouched(f"after {eventname!r} {payload!r}")


@fuzz_settings(200)
@given(payload=st.one_of(payload_text(), st.text(max_size=60)))
@example(payload="a:b:c")
@example(payload="processname:x\x1cpid:1")
def test_parse_payload_gives_fields_or_value_error(payload):
    try:
        fields = parse_payload(payload)
    except ValueError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
