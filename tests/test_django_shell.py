"""``manage.py celery`` is the CLI's own click tree behind Django's argparse.

Real Django (the demo project): ``manage.py`` subprocesses for what a user
sees (``help``, colour, the old app entry), ``call_command`` in-process for
keyword arguments and ``CommandError``. The one process a kill is pointed at
is a signal witness, and only with ``dry_run``: nothing is signalled.
"""

import io
import json
import os
import re
import subprocess
import sys

import pytest

from celery_supervise import cli

from realsupervisor import DJANGO_APP
from test_fuzz import private_lock  # noqa: F401 (a fixture)
from test_refusals import spawn_witness, true_record, witness, write  # noqa: F401 (fixtures)

ANSI = re.compile(r"\x1b\[")


def manage(*args, env=None, cwd=DJANGO_APP):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def sections(help_text):
    """``manage.py help``'s listing: {"[app]": [commands]}."""
    found, current = {}, None
    for line in help_text.splitlines():
        if line.startswith("["):
            current = found.setdefault(line.strip(), [])
        elif current is not None and line.startswith("    "):
            current.append(line.strip())
    return found


@pytest.fixture
def django_settings(tmp_path, monkeypatch):
    """Django set up in this process with ``demo.settings`` (read once per process)."""
    monkeypatch.setenv("CELERY_SUPERVISE_BROKER_DIR", str(tmp_path / "broker"))
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "demo.settings")
    monkeypatch.syspath_prepend(str(DJANGO_APP))
    import django

    django.setup()
    from django.conf import settings

    return settings


# ------------------------------------------------------------ where it is listed


def test_help_lists_the_command_under_its_own_app():
    res = manage("help")
    assert res.returncode == 0, res.stderr
    listing = sections(res.stdout)
    assert listing["[celery_supervise]"] == ["celery"]
    assert "celery" not in listing.get("[django]", [])


def test_the_old_app_entry_still_works_and_check_says_it_is_deprecated(tmp_path):
    (tmp_path / "old_entry_settings.py").write_text(
        "from demo.settings import *  # noqa\n"
        "INSTALLED_APPS = [a if a != 'celery_supervise' else 'celery_supervise.contrib.django'"
        " for a in INSTALLED_APPS]\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(DJANGO_APP)]),
           "DJANGO_SETTINGS_MODULE": "old_entry_settings", "CELERY_SUPERVISE_BROKER_DIR": str(tmp_path / "b")}

    assert "celery" in sections(manage("help", env=env).stdout)["[django]"]
    check = manage("check", env=env)
    assert check.returncode == 0, check.stderr
    assert "(celery_supervise.W001) 'celery_supervise.contrib.django' in INSTALLED_APPS is deprecated." in check.stderr
    assert "HINT: Use 'celery_supervise' instead" in check.stderr
    res = manage("celery", "kill", str(tmp_path / "nope.json"), env=env)
    assert (res.returncode, res.stderr.splitlines()) == (1, [f"CommandError: {tmp_path}/nope.json: no such file"])


# --------------------------------------------------------------- one option table


def test_every_verb_but_the_listener_with_the_clis_own_options():
    """The parser is built from the click tree: same verbs, same flags, same help, hidden stays hidden."""
    from celery_supervise.contrib.django.command import Command, verbs

    tree = cli.command_tree().commands
    assert set(verbs()) == set(tree) - {"listener"}
    parser = Command().create_parser("manage.py", "celery")
    [sub] = [a for a in parser._actions if a.dest == "verb"]
    for name, command in verbs().items():
        options = {s: a for a in sub.choices[name]._actions for s in a.option_strings}
        for param in command.params:
            if param.param_type_name != "option":
                continue
            for flag in param.opts:
                assert flag in options, (name, flag)
                action = options[flag]
                if param.hidden:
                    assert action.help == "==SUPPRESS==", (name, flag)
                else:
                    assert action.help.replace("%%", "%").startswith(param.help), (name, flag)


# ---------------------------------------------------------- call_command kwargs


def test_call_command_with_keyword_options(django_settings, tmp_path, capsys):
    state = tmp_path / "state.json"
    out, err = io.StringIO(), io.StringIO()
    from django.core.management import call_command

    call_command("celery", "savepid", str(state), json=True, reply_timeout=0.5, stdout=out, stderr=err)
    assert json.loads(out.getvalue())["path"] == str(state)

    out = io.StringIO()
    call_command("celery", "status", json=True, stdout=out, stderr=io.StringIO())
    assert json.loads(out.getvalue())["kind"] == "celery-supervise/state"

    out = io.StringIO()
    call_command("celery", "kill", str(state), dry_run=True, json=True, grace=1, stdout=out, stderr=io.StringIO())
    assert json.loads(out.getvalue())["dry_run"] is True
    # Everything went to the buffers given, nothing to the process's own streams.
    assert capsys.readouterr() == ("", "")


def test_call_command_old_timeout_is_one_deprecation_note(django_settings):
    from django.core.management import call_command

    out, err = io.StringIO(), io.StringIO()
    call_command("celery", "status", "--json", timeout=0.5, stdout=out, stderr=err)
    assert json.loads(out.getvalue())["kind"] == "celery-supervise/state"
    notes = [line for line in err.getvalue().splitlines() if "deprecated" in line]
    assert notes == ["manage.py celery: warning: --timeout is deprecated; use --reply-timeout (same meaning)"]


@pytest.mark.parametrize("verb, args, kwargs, code, message", [
    ("kill", ["{tmp}/nope.json"], {}, 1, "{tmp}/nope.json: no such file"),
    ("kill", ["{tmp}/nope.json"], {"grace": -1}, 2, "Invalid value for '--grace'"),  # the rest is typer's wording
    ("kill", ["{tmp}/nope.json"], {"reply_timeout": 1}, 2, "kill has no option reply_timeout"),
    ("status", [], {"spare": "sometimes"}, 2, "--spare: unknown rule sometimes"),
])
def test_call_command_errors_carry_the_clis_exit_code(django_settings, tmp_path, verb, args, kwargs, code, message):
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError) as info:
        call_command("celery", verb, *[a.format(tmp=tmp_path) for a in args], **kwargs,
                     stdout=io.StringIO(), stderr=io.StringIO())
    assert info.value.returncode == code
    assert message.format(tmp=tmp_path) in str(info.value)


# ------------------------------------------------------------------------ colour


@pytest.mark.parametrize("flags, env, coloured", [
    ([], {}, False),
    (["--force-color"], {}, True),
    (["--no-color"], {"FORCE_COLOR": "1"}, False),
    ([], {"FORCE_COLOR": "1"}, True),
], ids=["off a terminal", "--force-color", "--no-color beats FORCE_COLOR", "FORCE_COLOR"])
def test_colour_follows_djangos_options(flags, env, coloured, witness, tmp_path, private_lock):  # noqa: F811
    state = write(tmp_path / "state.json", true_record(witness))
    for argv in (["celery", *flags, "kill", "--dry-run", state], ["celery", "kill", "--dry-run", state, *flags]):
        res = manage(*argv, env={"CELERY_SUPERVISE_LOCK": private_lock, **env})
        assert res.returncode == 0, res.stderr
        assert "would kill" in res.stdout
        assert bool(ANSI.search(res.stdout)) is coloured, (argv, res.stdout)
    witness.assert_untouched()
