"""The CLI as a package presents it: --version, completion, exit codes in --help, renamed options, metadata.

Real subprocesses of the installed ``celery-supervise`` where the shell's
behaviour is the point (stdout, stderr, exit code); the click command tree
in-process for the tables. Nothing here starts a worker or signals anything.
"""

import importlib.metadata
import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import celery_supervise
from celery_supervise import cli
from celery_supervise.errors import UsageError, exit_codes

from realsupervisor import copy_project

BIN = Path(sys.executable).parent


def run(*args, cwd=None, env=None):
    return subprocess.run([str(BIN / "celery-supervise"), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=cwd, env={**os.environ, **(env or {})})


def flat(text):
    return " ".join(text.split())


# ----------------------------------------------------------------- --version


@pytest.mark.parametrize("argv", [[str(BIN / "celery-supervise")], [sys.executable, "-m", "celery_supervise"]],
                         ids=["script", "python -m"])
def test_version_is_the_installed_distributions(argv):
    res = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == f"celery-supervise {importlib.metadata.version('celery-supervise')}\n"
    assert importlib.metadata.version("celery-supervise") == celery_supervise.__version__


# ---------------------------------------------------------------- completion


def test_show_completion_prints_a_bash_script_for_our_program():
    res = run("--show-completion", "bash")
    assert res.returncode == 0, res.stderr
    assert "_CELERY_SUPERVISE_COMPLETE=complete_bash" in res.stdout
    assert "complete -o default -F _celery_supervise_completion celery-supervise" in res.stdout


@pytest.mark.parametrize("words, cword, expected", [
    ("celery-supervise sa", 1, ["savepid"]),
    ("celery-supervise drain --dr", 2, ["--drain-timeout"]),
])
def test_bash_completion_answers_through_run(words, cword, expected):
    """What the script above asks: run() is not click's standalone mode, and completion still answers."""
    res = run(env={"_CELERY_SUPERVISE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == expected


# ------------------------------------------------------ exit codes in --help


@pytest.mark.parametrize("name", sorted(cli.command_tree().commands))
def test_help_lists_the_commands_exit_codes(name, capsys):
    assert cli.run([name, "--help"]) == 0
    text = flat(capsys.readouterr().out)
    assert "Exit codes:" in text
    for code, meaning in exit_codes(name).items():
        assert flat(f"{code} {meaning}") in text, (code, meaning)


# ------------------------------------------------------------ renamed options


# (command, its arguments, what --timeout now is called): one meaning per name
RENAMED = [
    ("savepid", ["state.json"], "reply_timeout"),
    ("status", [], "reply_timeout"),
    ("restart", ["celery-worker"], "reply_timeout"),
    ("drain", [], "drain_timeout"),
]


@pytest.mark.parametrize("name, args, new", RENAMED, ids=[r[0] for r in RENAMED])
def test_the_old_timeout_keeps_its_meaning_with_one_note(name, args, new, capsys):
    command = cli.command_tree().commands[name]
    flag = "--" + new.replace("_", "-")

    ctx = command.make_context(name, [*args, "--timeout", "7"])
    assert cli.renamed(ctx, "timeout", new) == 7.0
    assert capsys.readouterr().err == f"{name}: warning: --timeout is deprecated; use {flag} (same meaning)\n"

    ctx = command.make_context(name, [*args, flag, "5"])
    assert cli.renamed(ctx, "timeout", new) == 5.0
    assert capsys.readouterr().err == ""

    ctx = command.make_context(name, [*args, flag, "5", "--timeout", "7"])
    with pytest.raises(UsageError, match=f"--timeout is the old name of {flag}; give only {flag}"):
        cli.renamed(ctx, "timeout", new)


@pytest.mark.parametrize("name", [r[0] for r in RENAMED])
def test_the_old_timeout_is_not_in_help(name, capsys):
    assert cli.run([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--timeout " not in text and ("--reply-timeout" in text or "--drain-timeout" in text)


def test_drain_timeout_through_the_old_spelling_end_to_end(tmp_path):
    """The whole command: one note on stderr, and the drain's JSON reports the old option's value."""
    project = copy_project(tmp_path / "project")  # no worker runs from this copy
    res = run("-A", "demo", "drain", "--timeout", "7", "--json", cwd=project,
              env={"CELERY_SUPERVISE_BROKER_DIR": str(tmp_path / "broker")})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["timeout"] == 7.0
    notes = [line for line in res.stderr.splitlines() if "deprecated" in line]
    assert notes == ["celery-supervise: warning: --timeout is deprecated; use --drain-timeout (same meaning)"]


def test_both_spellings_is_a_usage_error():
    res = run("status", "--timeout", "1", "--reply-timeout", "2")
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["celery-supervise: usage: --timeout is the old name of --reply-timeout; "
                                       "give only --reply-timeout"]


# ------------------------------------------------------------------ metadata


def test_metadata_names_license_urls_and_unpinned_cli_libraries():
    meta = importlib.metadata.metadata("celery-supervise")
    assert meta["License-Expression"] == "MIT"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert {u.split(",")[0] for u in meta.get_all("Project-URL")} >= {"Homepage", "Source", "Issues"}
    requires = importlib.metadata.requires("celery-supervise")
    for name in ("typer", "rich"):
        [req] = [r for r in requires if r.startswith(name) and "extra" not in r]
        assert "<" not in req, req
    assert any(r.startswith("kombu[redis]") and 'extra == "redis"' in r for r in requires), requires
    assert (importlib.resources.files("celery_supervise") / "py.typed").is_file()
