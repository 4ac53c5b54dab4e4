"""A small parser for the hot verbs (savepid, status, kill) and the listener, without typer.

Why: typer (0.29) builds a pydantic adapter for every parameter at each
parse, and importing typer, click and pydantic costs more CPU than the
whole rest of savepid beyond the broker round trip (bench/README.md has the
breakdown). savepid and status run in supervisord's stop budget, on every
deploy; their cost is measured against the floor of the same round trips.

How: :func:`parse` reads a command line it *fully* understands, with the
option rows of :mod:`celery_supervise.options` (the plain-data table the
typer CLI is built from too), and returns a :class:`Call`; for anything else it
returns None and the console entry point (:mod:`celery_supervise.entry`)
hands the command line to the typer CLI untouched, so help, completion,
``--version``, the deprecated ``--timeout``, unknown options and every
error are typer's, with typer's messages. Declining is always safe; so
the parser declines whatever it does not need: repeated single options,
``-Avalue`` and ``--`` spellings, empty values, values that begin with
``-``, numbers other than plain decimals.

The parse must agree with typer's: ``tests/test_fastpath.py``
proves, for generated command lines, that every one this parser accepts
gives the same parameters as typer's own parse, and that it declines the
ones typer refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from . import options as table

TEXT, FLOAT, INT, FLAG = "text", "float", "int", "flag"


@dataclass(frozen=True)
class Opt:
    """One option: its parameter name, spellings, kind, default, bounds.

    Values are what click's parse holds in ``ctx.params``: a tuple for a
    repeatable option.
    """

    name: str
    flags: tuple[str, ...]
    kind: str = TEXT
    default: object = None
    minimum: float | None = None  # inclusive, as click's FloatRange(min=...)
    multiple: bool = False
    envvar: str | None = None
    required: bool = False  # missing: declined, for typer's message


@dataclass(frozen=True)
class Verb:
    arguments: tuple[str, ...]  # required positional arguments, one value each
    options: tuple[Opt, ...]


def _option(name: str) -> Opt:
    """The parser's view of the option row *name* of :mod:`celery_supervise.options`."""
    row = table.OPTIONS[name]
    kind = _KINDS[row.type]  # a KeyError here is a new option type this parser must learn first
    default = () if row.multiple else row.default
    return Opt(name, row.flags, kind, default, minimum=row.min, multiple=row.multiple, envvar=row.envvar,
               required=name in table.REQUIRED)


def _verb(name: str) -> Verb:
    rows = table.VERBS[name]
    return Verb(tuple(_PARAMETER.get(r, r) for r in rows if r in table.ARGUMENTS),
                tuple(_option(r) for r in rows if r in table.OPTIONS and r not in LEFT_TO_TYPER))


_KINDS = {str: TEXT, float: FLOAT, int: INT, bool: FLAG}
#: Argument rows whose Python parameter has another name.
_PARAMETER = {"kill_file": "file"}
#: The deprecated ``--timeout``: typer prints its note.
LEFT_TO_TYPER = frozenset({"timeout"})
#: The verbs this parser takes. The listener is not hot, but long-lived:
#: without typer (and the pydantic it brings) it holds 7 MB less for as
#: long as supervisord runs.
HOT_VERBS = ("savepid", "status", "kill", "listener")

#: The root's options (before the verb), and each hot verb's.
ROOT = (_option("app_spec"),)
VERBS = {verb: _verb(verb) for verb in HOT_VERBS}

#: Shell completion asks through the environment: always typer's business.
COMPLETION_ENV_PREFIXES = ("_CELERY_SUPERVISE_COMPLETE", "_TYPER_COMPLETE")

_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?\Z")
_DIGITS = re.compile(r"[0-9]+\Z")


@dataclass(frozen=True)
class Call:
    """A parsed hot command: the verb, ``-A``, and the verb's parameters by name."""

    verb: str
    app_spec: str | None
    params: dict = field(default_factory=dict)


def _value(opt: Opt, raw: str):
    """*raw* converted for *opt*, or None when the parser declines it."""
    if raw == "" or raw.startswith("-"):
        return None
    if opt.kind in (FLOAT, INT):
        if not (_DECIMAL if opt.kind == FLOAT else _DIGITS).match(raw):
            return None
        number = float(raw) if opt.kind == FLOAT else int(raw)
        return number if opt.minimum is None or number >= opt.minimum else None
    return raw


def _options(options: Sequence[Opt], tokens: list[str], positionals: list[str] | None):
    """The options in *tokens* as ``{name: value}``; None to decline.

    With *positionals* None, parsing stops at the first token that is not
    an option (the verb); otherwise positionals are collected there.
    Consumes *tokens* from the front.
    """
    by_flag = {f: o for o in options for f in o.flags}
    found: dict = {}
    while tokens:
        token = tokens[0]
        if not token.startswith("-"):
            if positionals is None:
                break
            positionals.append(tokens.pop(0))
            continue
        tokens.pop(0)
        flag, eq, attached = token.partition("=")
        opt = by_flag.get(flag)
        if opt is None or (eq and not flag.startswith("--")):
            return None
        if opt.kind == FLAG:
            if eq:
                return None
            found[opt.name] = True
            continue
        if eq:
            raw = attached
        elif tokens:
            raw = tokens.pop(0)
        else:
            return None
        value = _value(opt, raw)
        if value is None:
            return None
        if opt.multiple:
            found.setdefault(opt.name, []).append(value)
        elif opt.name in found:
            return None  # click keeps the last; rare enough to leave to it
        else:
            found[opt.name] = value
    return found


def _defaults(options: Sequence[Opt], found: dict, environ: Mapping[str, str]) -> dict | None:
    params = {}
    for opt in options:
        if opt.name in found:
            params[opt.name] = tuple(found[opt.name]) if opt.multiple else found[opt.name]
        elif opt.required:
            return None
        elif opt.envvar and environ.get(opt.envvar):
            if opt.multiple:
                return None  # click splits such a variable on spaces; no option of ours does this
            value = _value(opt, environ[opt.envvar])
            if value is None:
                return None
            params[opt.name] = value
        else:
            params[opt.name] = opt.default
    return params


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Call | None:
    """The hot command *argv* (without the program name) as a :class:`Call`, or None to decline."""
    if any(key.startswith(COMPLETION_ENV_PREFIXES) for key in environ):
        return None
    tokens = list(argv)
    root = _options(ROOT, tokens, None)
    if root is None or not tokens or tokens[0] not in VERBS:
        return None
    name = tokens.pop(0)
    verb = VERBS[name]
    positionals: list[str] = []
    found = _options(verb.options, tokens, positionals)
    if found is None or len(positionals) != len(verb.arguments) or "" in positionals:
        return None
    root_params = _defaults(ROOT, root, environ)
    params = _defaults(verb.options, found, environ)
    if root_params is None or params is None:
        return None
    params.update(zip(verb.arguments, positionals))
    return Call(name, root_params["app_spec"], params)
