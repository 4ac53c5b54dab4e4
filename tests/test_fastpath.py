"""The typer-free parser of the hot verbs says exactly what the typer CLI says.

For any command line :func:`celery_supervise.fastpath.parse` accepts, the
typer CLI's own parse (the click command tree, as ``celery-supervise``
runs it) yields the same verb, ``-A`` and parameters; everything else is
declined, and so goes to typer, which prints its usual help and errors.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

from celery_supervise import cli, fastpath

ENV_KEYS = ("CELERY_APP", "SUPERVISOR_SERVER_URL")


@contextlib.contextmanager
def environment(env: dict):
    """os.environ with *env* for the two variables the options read (and no completion request)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ENV_KEYS and not k.startswith(fastpath.COMPLETION_ENV_PREFIXES)}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        yield


def typer_parse(argv: list[str]):
    """``(verb, app_spec, params)`` as the typer CLI parses *argv*; None when it refuses or only prints."""
    group = cli.command_tree()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            with group.make_context(cli.PROG, list(argv)) as ctx:
                # click 8.2 renamed protected_args to a private attribute.
                protected = getattr(ctx, "_protected_args", None)
                if protected is None:
                    protected = ctx.protected_args
                name, command, rest = group.resolve_command(ctx, list(protected) + list(ctx.args))
                with command.make_context(name, rest, parent=ctx) as sub:
                    params = dict(sub.params)
    except (Exception, SystemExit):  # click's usage errors, typer.Exit for --help / --version
        return None
    # A repeatable option is a list or a tuple depending on typer's version
    # (and None or () when absent); the verbs read it as tuple(value or ()).
    for p in command.params:
        if p.multiple:
            params[p.name] = tuple(params[p.name] or ())
    return name, ctx.params["app_spec"], params


def fast_parse(argv: list[str], env: dict):
    with environment(env):
        call = fastpath.parse(argv, os.environ)
    if call is None:
        return None
    params = dict(call.params)
    if call.verb in ("savepid", "status"):
        params["timeout"] = None  # the deprecated spelling, left to typer
    return call.verb, call.app_spec, params


def assert_same(argv: list[str], env: dict):
    fast = fast_parse(argv, env)
    if fast is None:
        return None
    with environment(env):
        slow = typer_parse(argv)
    assert slow == fast, f"argv={argv} env={env}"
    return fast


# ----------------------------------------------------------------- tables

ACCEPTED = [
    (["-A", "demo", "savepid", "/tmp/s.json"], {}),
    (["--app", "demo", "savepid", "/tmp/s.json", "--json"], {}),
    (["--app=proj.celery:app", "savepid", "--reply-timeout", "0.5", "s.json"], {}),
    (["savepid", "s.json", "--program", "a*", "--program=b", "--spare", "setsid"], {"CELERY_APP": "demo"}),
    (["-A", "demo", "savepid", "s.json", "--supervisor-url", "unix:///run/s.sock"], {}),
    (["-A", "demo", "savepid", "s.json"], {"SUPERVISOR_SERVER_URL": "http://127.0.0.1:9001"}),
    (["-A", "demo", "status"], {}),
    (["-A", "demo", "status", "--json", "--json", "--reply-timeout=0.05"], {}),
    (["status"], {}),
    (["kill", "s.json"], {}),
    (["-A", "demo", "kill", "--grace", "0", "--dry-run", "s.json", "--spare", "none", "--json"], {}),
    (["kill", "s.json", "--grace=2.5"], {}),
    (["-A", "demo", "listener", "--state-dir", "/var/lib/cs", "--program", "w*", "--grace", "2"], {}),
    (["listener", "--spare=setsid", "--state-dir=/tmp/s"], {}),
    # --cgroups (issue 13): text here, its values checked where the verb runs, as under typer.
    (["-A", "demo", "savepid", "s.json", "--cgroups", "off"], {}),
    (["-A", "demo", "status", "--cgroups=auto", "--json"], {}),
    (["status", "--cgroups", "maybe"], {}),  # parsed alike; the verb refuses it (exit 2) on both paths
    (["kill", "--cgroups", "off", "s.json", "--dry-run"], {}),
    (["listener", "--state-dir", "/tmp/s", "--cgroups=off"], {}),
]

DECLINED = [
    ([], {}),
    (["--help"], {}),
    (["--version"], {}),
    (["-A", "demo", "savepid", "--help"], {}),
    (["-A", "demo", "savepid", "-h"], {}),
    (["-A", "demo", "savepid"], {}),  # FILE missing: typer's message
    (["-A", "demo", "savepid", "a", "b"], {}),
    (["-A", "demo", "savepid", "s.json", "--timeout", "1"], {}),  # deprecated: typer's note
    (["-A", "demo", "savepid", "s.json", "--reply-timeout", "0.01"], {}),  # below the minimum
    (["-A", "demo", "savepid", "s.json", "--reply-timeout", "fast"], {}),
    (["-A", "demo", "savepid", "s.json", "--reply-timeout", "1e3"], {}),
    (["-A", "demo", "savepid", "s.json", "--reply-timeout"], {}),
    (["-A", "demo", "savepid", "s.json", "--unknown"], {}),
    (["-A", "demo", "savepid", "--", "s.json"], {}),
    (["-A", "demo", "savepid", "-"], {}),
    (["-A", "demo", "savepid", ""], {}),
    (["-Ademo", "savepid", "s.json"], {}),
    (["-A", "a", "-A", "b", "status"], {}),
    (["status", "--spare", "setsid", "--spare", "nohup"], {}),
    (["status", "--json=1"], {}),
    (["status", "-A", "demo"], {}),
    (["kill", "s.json", "--grace", "-1"], {}),
    (["drain"], {}),
    (["listener"], {}),  # --state-dir is required: typer's message
    (["listener", "--state-dir", "/tmp/s", "x"], {}),
    (["restart", "prog"], {}),
    (["status", "--cgroups"], {}),  # no value: typer's message
    (["status", "--cgroups", "off", "--cgroups", "auto"], {}),  # repeated: click keeps the last
    (["status", "--cgroups", ""], {}),
    (["contain", "--", "sleep", "1"], {}),  # not a hot verb: typer's
    (["-A", "demo", "status"], {"_CELERY_SUPERVISE_COMPLETE": "bash_complete"}),
]


@pytest.mark.parametrize("argv,env", ACCEPTED)
def test_accepted_command_lines_parse_as_typer_does(argv, env):
    assert assert_same(argv, env) is not None, f"the fast path declined {argv}"


@pytest.mark.parametrize("argv,env", DECLINED)
def test_everything_else_is_left_to_typer(argv, env):
    assert fast_parse(argv, env) is None


# ------------------------------------------------------------- generated

_VALUES = ["demo", "s.json", "/tmp/x y.json", "0", "0.05", "0.01", "2", "1.5", "10", "-1", "", "nan",
           "1e3", "setsid", "none", "nohup,pgroup", "-", "--", "=", "a=b", "unix:///run/s.sock",
           "auto", "off"]
_FLAGS = sorted({f for v in fastpath.VERBS.values() for o in v.options for f in o.flags}
                | {"-A", "--app", "--timeout", "--help", "-h", "--version", "--grace", "--nope", "-d", "--all"})
_TOKENS = st.one_of(
    st.sampled_from(_FLAGS),
    st.sampled_from(_VALUES),
    st.builds(lambda f, v: f"{f}={v}", st.sampled_from(_FLAGS), st.sampled_from(_VALUES)),
)
_VERB_WORDS = sorted(fastpath.VERBS) + ["drain", "requeue", "savepids", "-A"]
_ENVS = st.fixed_dictionaries({}, optional={k: st.sampled_from(["", "demo", "x", "-x"]) for k in ENV_KEYS})


@settings(max_examples=400, deadline=None)
@given(before=st.lists(_TOKENS, max_size=3), verb=st.sampled_from(_VERB_WORDS),
       after=st.lists(_TOKENS, max_size=6), env=_ENVS)
def test_generated_command_lines_parse_as_typer_does_or_are_declined(before, verb, after, env):
    assert_same(before + [verb] + after, env)


@settings(max_examples=200, deadline=None)
@given(verb=st.sampled_from(sorted(fastpath.VERBS)), data=st.data())
def test_well_formed_command_lines_are_accepted(verb, data):
    """Any ordering of valid options of a verb is taken by the fast path (so it is not declining everything)."""
    spec = fastpath.VERBS[verb]
    groups = [(data.draw(st.sampled_from(["s.json", "/tmp/f"])),)] if spec.arguments else []
    chosen = data.draw(st.lists(st.sampled_from(spec.options), unique_by=lambda o: o.name))
    chosen += [o for o in spec.options if o.required and o not in chosen]
    for opt in chosen:
        if opt.kind == fastpath.FLAG:
            groups.append((opt.flags[0],))
        else:
            value = data.draw(st.sampled_from(["0.5", "2", "30"] if opt.kind == fastpath.FLOAT
                                              else ["auto", "off"] if opt.name == "cgroups" else ["demo", "a*"]))
            groups.append((opt.flags[0], value))
    tokens = data.draw(st.permutations(groups))
    argv = ["-A", "demo", verb] + [t for group in tokens for t in group]
    assert assert_same(argv, {}) is not None, f"the fast path declined {argv}"


def test_table_defaults_and_bounds_are_the_clis():
    """Every option of the table has the typer option's spellings, default, minimum and multiplicity."""
    tree = cli.command_tree()
    root = {p.name: p for p in tree.params}
    for opt in fastpath.ROOT:
        assert set(opt.flags) <= set(root[opt.name].opts)
        assert root[opt.name].envvar == opt.envvar
    for verb, spec in fastpath.VERBS.items():
        params = {p.name: p for p in tree.commands[verb].params}
        assert [p.name for p in tree.commands[verb].params if p.param_type_name == "argument"] == list(spec.arguments)
        for opt in spec.options:
            param = params[opt.name]
            assert set(opt.flags) == set(param.opts), (verb, opt.name)
            assert param.multiple == opt.multiple
            assert param.envvar == opt.envvar
            assert param.required == opt.required, (verb, opt.name)
            if opt.kind != fastpath.TEXT:
                assert param.default == opt.default
            # Minimums: typer 0.29 keeps them in its pydantic adapters, not
            # on the option; the generated test (0, 0.01, 0.05, -1) proves them.
        # Options the table leaves out are left to typer (the deprecated --timeout).
        left = {n for n, p in params.items() if p.param_type_name == "option"} - {o.name for o in spec.options}
        assert left <= {"timeout"}, (verb, left)


def test_console_script_runs_the_fast_path_without_typer(tmp_path):
    """``celery-supervise kill FILE --dry-run`` on an empty record: done, and typer never imported."""
    record = tmp_path / "empty.json"
    probe = ("import sys, runpy\n"
             "import celery_supervise.entry as e\n"
             "real = e.os._exit\n"
             "def exit_(code):\n"
             "    sys.stderr.write('typer loaded: %s\\n' % ('typer' in sys.modules)); sys.stderr.flush(); real(code)\n"
             "e.os._exit = exit_\n"
             "sys.argv = ['celery-supervise'] + sys.argv[1:]\n"
             "e.main()\n")
    bare = subprocess.run([sys.executable, "-c", probe, "kill", str(record), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert "typer loaded: False" in bare.stderr, bare.stderr
    # The same record through typer: the same exit code and the same first line.
    full = subprocess.run([sys.executable, "-c", "import sys; from celery_supervise import cli; "
                           "sys.exit(cli.run(sys.argv[1:]))", "kill", str(record), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == full.returncode
    assert bare.stdout == full.stdout
    assert bare.stderr.splitlines()[:-1] == full.stderr.splitlines()
