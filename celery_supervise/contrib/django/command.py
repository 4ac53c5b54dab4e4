"""``python manage.py celery VERB ...``: the Django shell over the CLI's own commands.

The typer app in :mod:`celery_supervise.cli` is the one table of verbs and
options. This command builds its argparse subcommands from that app's click
command tree (flags, multiple, help, hidden), then turns the parsed options
back into a command line and runs the very same click command. Types,
ranges, defaults, environment variables, validation, deprecation notes and
exit codes are the CLI's; a verb added to the CLI appears here with no code.

What is Django's here:

* ``-A`` comes from ``settings.CELERY_SUPERVISE_APP`` ("module:attribute"),
  else from the package of ``DJANGO_SETTINGS_MODULE`` (``proj.settings`` ->
  ``proj``, which Celery resolves to ``proj.celery:app`` as ``celery -A
  proj`` does);
* output goes to the command's ``stdout``/``stderr`` (so ``call_command(...,
  stdout=buf)`` captures it), coloured as ``--no-color``/``--force-color``
  say;
* errors, and results that stopped short, become ``CommandError`` with the
  CLI's exit code as its ``returncode``;
* ``call_command("celery", "status", json=True)``: keyword arguments are the
  options' long names (``reply_timeout=5``, ``dry_run=True``, ``program=[...]``).
"""

from __future__ import annotations

import argparse
import contextlib
import os

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from celery_supervise import cli, render
from celery_supervise.errors import EXIT_OK, Outcome, exit_codes

#: CLI verbs this command does not offer: the listener's stdout is
#: supervisord's eventlistener protocol, not a management command's output.
NOT_IN_DJANGO = frozenset({"listener"})

#: Django's own options, accepted after the verb too (``celery status --no-color``).
DJANGO_OPTIONS = (("--no-color",), ("--force-color",), ("--traceback",))

#: Options every Django command has (BaseCommand's), besides the verb's own.
BASE_OPTIONS = frozenset({"verbosity", "settings", "pythonpath", "traceback", "no_color", "force_color",
                          "skip_checks", "stdout", "stderr"})


def default_app_spec() -> str | None:
    spec = getattr(settings, "CELERY_SUPERVISE_APP", None)
    if spec:
        return spec
    module = os.environ.get("DJANGO_SETTINGS_MODULE", "")
    return module.rsplit(".", 1)[0] if "." in module else None


def verbs() -> dict:
    """The CLI's click commands this command offers, by name."""
    return {name: command for name, command in cli.command_tree().commands.items()
            if not command.hidden and name not in NOT_IN_DJANGO}


def dest(param) -> str:
    """The argparse ``dest`` (and ``call_command`` keyword) of a click parameter: its long name."""
    if param.param_type_name != "option":
        return param.name
    longs = [o for o in param.opts if o.startswith("--")] or param.opts
    return longs[0].lstrip("-").replace("-", "_")


class Stream:
    """A text stream over a Django ``OutputWrapper``, written as is.

    ``OutputWrapper.write`` ends each write with a newline and styles
    stderr as an error; rich and click write whole chunks that already end
    as they should, so each chunk goes through unchanged.
    """

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def write(self, text: str) -> int:
        self.wrapper.write(text, style_func=lambda s: s, ending="")
        return len(text)

    def flush(self) -> None:
        self.wrapper.flush()

    def isatty(self) -> bool:
        return self.wrapper.isatty()


class Command(BaseCommand):
    help = ("Record, show and kill this host's Celery worker trees, drain the workers, restart their "
            "supervisord programs, or requeue the tasks a stop cut off (celery-supervise).")
    # The command acts on processes, not on models or URLs: an unrelated
    # failing check must not stop a deploy's savepid or kill.
    requires_system_checks = []

    def add_arguments(self, parser):
        commands = verbs()
        sub = parser.add_subparsers(dest="verb", metavar="{" + ",".join(commands) + "}", required=True)
        for name, command in commands.items():
            p = sub.add_parser(name, help=command.get_short_help_str(limit=200), description=command.help,
                               epilog="exit codes:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning
                                                                 in exit_codes(name).items()),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            for param in command.params:
                self._add(p, param)
            for flags in DJANGO_OPTIONS:
                p.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    @staticmethod
    def _add(parser, param) -> None:
        """One click parameter as an argparse argument; values stay text, for click to check."""
        if param.param_type_name == "argument":
            nargs = None if param.nargs == 1 else ("+" if param.required else "*")
            parser.add_argument(param.name, nargs=nargs, metavar=(param.metavar or param.name.upper()).rstrip("."))
            return
        text = argparse.SUPPRESS if param.hidden else (param.help or "").replace("%", "%%")
        if not param.hidden and isinstance(param.default, (int, float, str)) and not isinstance(param.default, bool):
            text += f" [default: {param.default}]"
        if param.envvar and not param.hidden:
            text += f" [env var: {param.envvar}]"
        kwargs = dict(dest=dest(param), default=None, help=text)
        if param.is_flag and param.secondary_opts:
            parser.add_argument(*param.opts, action="store_const", const=True, **kwargs)
            parser.add_argument(*param.secondary_opts, action="store_const", const=False, dest=kwargs["dest"],
                                default=None, help=argparse.SUPPRESS)
        elif param.is_flag:
            parser.add_argument(*param.opts, action="store_const", const=True, **kwargs)
        elif getattr(param, "count", False):
            parser.add_argument(*param.opts, action="count", **kwargs)
        else:
            parser.add_argument(*param.opts, action="append" if param.multiple else "store",
                                nargs=None if param.nargs == 1 else param.nargs,
                                metavar=param.metavar or param.name.upper(), required=param.required, **kwargs)

    @staticmethod
    def argv(command, options: dict) -> list[str]:
        """The command line that gives *command* these parsed (or ``call_command``) options."""
        opts, args = [], []
        for param in command.params:
            value = options.get(dest(param))
            if param.param_type_name == "argument":
                if value is not None:
                    args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
                continue
            if value is None or value is False and not param.secondary_opts:
                continue
            if param.is_flag:
                opts.append(param.opts[0] if value else param.secondary_opts[0])
            elif getattr(param, "count", False):
                opts += [param.opts[0]] * int(value)
            else:
                values = value if param.multiple and isinstance(value, (list, tuple)) else [value]
                for v in values:
                    opts += [param.opts[0], *map(str, v if isinstance(v, (list, tuple)) else [v])]
        return [*opts, "--", *args] if args else opts

    def handle(self, *args, verb, **options):
        command = verbs()[verb]
        known = {dest(p) for p in command.params} | BASE_OPTIONS
        stray = sorted(k for k, v in options.items() if v is not None and k not in known)
        if stray:
            raise CommandError(f"{verb} has no option {', '.join(stray)}", returncode=2)
        spec = default_app_spec()
        argv = [*(["-A", spec] if spec else []), verb, *self.argv(command, options)]
        token = render.COLOR.set(False if options.get("no_color") else True if options.get("force_color") else None)
        try:
            with contextlib.redirect_stdout(Stream(self.stdout)), contextlib.redirect_stderr(Stream(self.stderr)):
                code = cli.invoke(argv, prog_name="manage.py celery")
                cli.say(code)
        except (Exception, KeyboardInterrupt) as exc:
            known_error = cli.one_line(exc)
            if known_error is None:
                if options.get("traceback"):
                    raise
                raise CommandError(cli.internal_error(exc)) from None
            code, kind, message = known_error
            if code == EXIT_OK:
                return
            raise CommandError(message or kind, returncode=code) from None
        finally:
            render.COLOR.reset(token)
        if code != EXIT_OK:
            outcome = code if isinstance(code, Outcome) else Outcome(code)
            raise CommandError(outcome.explain(verb), returncode=int(code))
