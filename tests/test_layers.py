"""The architecture, checked: layers as folders, modules of readable size, each option declared once.

See docs/architecture.md. The process layer (``celery_supervise/processes/``)
must work on plain data and real processes alone: it imports neither Celery,
kombu nor supervisor, and nothing of the layers above it. A new verb is one
module in ``commands/`` and one registration in the CLI; an option is one row
of :mod:`celery_supervise.options`.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

import celery_supervise
from celery_supervise import options

PACKAGE = pathlib.Path(celery_supervise.__file__).parent
PROCESS_LAYER = PACKAGE / "processes"
#: Third-party packages the process layer must never load, and our layers above it.
FOREIGN = ("celery", "kombu", "supervisor", "billiard", "typer", "click", "rich", "django")
ABOVE = ("celery_supervise.celery_side", "celery_supervise.supervisord", "celery_supervise.commands",
         "celery_supervise.cli", "celery_supervise.entry", "celery_supervise.fastpath",
         "celery_supervise.render", "celery_supervise.listener", "celery_supervise.contrib")
#: "No module is over about 450 lines."
MAX_LINES = 480


def modules(folder: pathlib.Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: pathlib.Path) -> set[str]:
    """Every module *path* imports, at any depth (lazy imports in functions included), as absolute names."""
    package = ".".join(("celery_supervise", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", modules(PROCESS_LAYER), ids=lambda p: p.name)
def test_the_process_layer_imports_no_celery_kombu_supervisor_nor_a_layer_above(path):
    bad = sorted(name for name in imported(path)
                 if name.split(".")[0] in FOREIGN or name.startswith(ABOVE))
    assert bad == [], f"{path.name} imports {bad}"


def test_importing_the_process_layer_loads_no_celery_kombu_or_supervisor():
    """The same, as Python sees it: a fresh interpreter imports every module of the layer."""
    names = [f"celery_supervise.processes.{p.stem}" for p in modules(PROCESS_LAYER) if p.stem != "__init__"]
    code = ("import json, sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True, timeout=60).stdout)
    assert [m for m in loaded if m.split(".")[0] in FOREIGN] == []
    assert [m for m in loaded if m.startswith(ABOVE)] == []


def test_options_import_nothing():
    """A fast argv parser may read the option table without typer, click or rich."""
    assert imported(PACKAGE / "options.py") == set()


@pytest.mark.parametrize("path", modules(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_about_450_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it"


def test_each_verb_is_one_module_of_commands():
    verbs = {name.replace("-", "_") for name in options.VERBS} - {"listener", "status"}
    assert verbs <= {p.stem for p in (PACKAGE / "commands").glob("*.py")}


def test_no_option_is_declared_twice():
    """Every flag the CLI offers comes from the table, and no row repeats another."""
    from celery_supervise import cli

    rows = [(o.flags, o.type, o.help) for o in options.OPTIONS.values() if not o.hidden]
    assert len(rows) == len(set(rows))
    source = (PACKAGE / "cli.py").read_text()
    assert "typer.Option(\"-" not in source and "typer.Option('-" not in source

    table = {flag for o in options.OPTIONS.values() for flag in o.flags}
    for name, command in cli.command_tree().commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert set(param.opts) <= table, f"{name}: {param.opts} is not in options.OPTIONS"


@pytest.mark.parametrize("verb", sorted(options.VERBS))
def test_every_verb_takes_the_options_the_table_gives_it(verb):
    from celery_supervise import cli

    command = cli.command_tree().commands[verb]
    expected = [options.row(n).flags if n in options.OPTIONS else None for n in options.VERBS[verb]]
    got = [tuple(p.opts) if p.param_type_name == "option" else None for p in command.params]
    assert got == expected


def test_the_spare_help_names_every_spare_rule():
    from celery_supervise.processes.plan import SPARE_RULES

    assert all(rule in options.OPTIONS["spare"].help for rule in SPARE_RULES)


def test_rendering_the_hot_verbs_loads_neither_drain_nor_restart():
    """savepid, status and kill render through :mod:`celery_supervise.render`; drain and restart are not theirs.

    Every module imported costs start-up time inside supervisord's stop
    budget (bench/savepid_vs_inspect.py measures savepid against the floor).
    """
    code = ("import json, sys\nimport celery_supervise.render, celery_supervise.entry\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True, timeout=60).stdout)
    assert [m for m in loaded if m in ("celery_supervise.celery_side.drain", "celery_supervise.commands.drain",
                                       "celery_supervise.commands.restart", "typer")] == []
