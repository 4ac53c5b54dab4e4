"""Every command-line option of celery-supervise, declared once, as plain data.

One row per option: its parameter name, its flags, its type, its default,
its help text and its validation (a lower bound, a metavar, an environment
variable). The typer CLI (:mod:`celery_supervise.cli`) builds its
parameters from these rows, and the Django command builds its argparse from
the CLI's click tree, so a help text or a bound is written here and nowhere
else. A row is shared by every verb that takes the option (``--grace`` is
one row for kill, restart, deploy and the listener).

This module imports nothing: a fast parser for the hot verbs (savepid,
status, kill) can read the table without loading typer, click or rich.
:data:`VERBS` says which options each verb takes, in the order of its
``--help``.
"""

# The defaults, one place: the core's keyword defaults come from here too.
GRACE = 10.0  # seconds between SIGTERM and SIGKILL
REPLY_TIMEOUT = 2.0  # seconds to wait for each broker reply
DRAIN_TIMEOUT = 60.0  # seconds a drain may take in all
START_TIMEOUT = 60.0  # seconds the new workers may take to answer a ping
SHUTDOWN_TIMEOUT = 120.0  # seconds supervisord may take to shut down


class Option:
    """One option: what a parser needs to read it and ``--help`` to explain it.

    *name* is the Python parameter (and ``call_command`` keyword); *flags*
    its spellings, long first unless a short one is the usual; *type* one
    of ``bool`` (a flag), ``int``, ``float``, ``str``; *multiple* means it
    may repeat and gives a list; *min* is the smallest value accepted.
    """

    __slots__ = ("name", "flags", "type", "default", "help", "metavar", "min", "envvar", "hidden", "multiple")

    def __init__(self, name, flags, type, default=None, help="", metavar=None, min=None, envvar=None,
                 hidden=False, multiple=False):
        self.name = name
        self.flags = tuple(flags)
        self.type = type
        self.default = default
        self.help = help
        self.metavar = metavar
        self.min = min
        self.envvar = envvar
        self.hidden = hidden
        self.multiple = multiple

    def __repr__(self):
        return f"Option({self.name!r}, {self.flags!r})"

    def check(self, value):
        """*value* as the option's type, or ValueError with the reason (for a parser without click)."""
        if self.type is bool or value is None:
            return value
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            kind = {int: "an integer", float: "a number"}.get(self.type, "text")
            raise ValueError(f"{self.flags[0]}: {value!r} is not {kind}") from None
        if self.min is not None and value < self.min:
            raise ValueError(f"{self.flags[0]}: {value} is smaller than the minimum {self.min}")
        return value


class Argument:
    """One positional argument: its name, metavar, help, and whether it takes several values."""

    __slots__ = ("name", "metavar", "help", "multiple")

    def __init__(self, name, help, metavar=None, multiple=False):
        self.name = name
        self.help = help
        self.metavar = metavar
        self.multiple = multiple

    def __repr__(self):
        return f"Argument({self.name!r})"


_SUPERVISORCTL_SEARCH = "[default: supervisorctl's search]"

OPTIONS = {o.name: o for o in (
    # The root's.
    Option("app_spec", ("-A", "--app"), str, metavar="APP", envvar="CELERY_APP",
           help="Your Celery app, as for `celery -A` (module or module:attribute)."),
    Option("version", ("--version",), bool, False, help="Print the version and exit."),
    # The variable is processes.audit.ENV (this module imports nothing).
    Option("audit_log", ("--audit-log",), str, metavar="PATH", envvar="CELERY_SUPERVISE_AUDIT_LOG",
           help="Append a JSON line before and after every signal sent here. [default: "
           "/var/log/celery-supervise/audit.jsonl as root, else $XDG_STATE_HOME/celery-supervise/audit.jsonl]"),
    # Shared by several verbs.
    Option("as_json", ("--json",), bool, False, help="Print one JSON document on stdout."),
    Option("dry_run", ("--dry-run",), bool, False, help="Show what would be signalled; signal nothing."),
    Option("journal", ("--journal",), str, metavar="DIR",
           help="The workers' task journal. [default: the one the app installs or its supervise_journal "
           "setting names]"),
    Option("spare", ("--spare",), str, metavar="RULES",
           help="Comma list of setsid, nohup, pgroup, or none. [default: setsid,nohup; "
           "kill: the policy recorded by savepid]"),
    Option("reply_timeout", ("--reply-timeout",), float, REPLY_TIMEOUT, metavar="SECONDS", min=0.05,
           help="Seconds to wait for each broker reply."),
    Option("drain_timeout", ("--drain-timeout",), float, DRAIN_TIMEOUT, metavar="SECONDS", min=0.1,
           help="Seconds the workers may take, in all, to finish their running tasks."),
    # The old spelling of --reply-timeout (savepid, status, restart): it keeps
    # its old meaning, see cli.renamed().
    Option("timeout", ("--timeout",), float, min=0.05, hidden=True),
    # ... and of --drain-timeout (drain), whose bound is drain's.
    Option("old_drain_timeout", ("--timeout",), float, min=0.1, hidden=True),
    Option("grace", ("--grace",), float, GRACE, metavar="SECONDS", min=0,
           help="Seconds between SIGTERM and SIGKILL."),
    Option("supervisor_url", ("--supervisor-url",), str, metavar="URL", envvar="SUPERVISOR_SERVER_URL",
           help="supervisord's XML-RPC URL, e.g. unix:///run/supervisor.sock or http://127.0.0.1:9001."),
    Option("program", ("--program",), str, metavar="GLOB", multiple=True,
           help="supervisord program(s) running the workers (repeatable)."),
    # savepid, status, kill, the listener and contain (docs/escapes.md); the
    # values are processes/cgroups.MODES, checked where the verb runs.
    Option("cgroups", ("--cgroups",), str, "auto", metavar="auto|off",
           help="auto: also track each worker's cgroup (v2), where it has one, for children that left its tree "
           "and process group; off: the tree and the process group only."),
    Option("start_timeout", ("--start-timeout",), float, START_TIMEOUT, metavar="SECONDS", min=0.1,
           help="Seconds the new workers may take to answer a ping."),
    # drain
    Option("destination", ("--destination", "-d"), str, metavar="NODE", multiple=True,
           help="Drain this worker node, e.g. demo@host (repeatable). [default: this host's workers of -A APP]"),
    Option("all_workers", ("--all",), bool, False, help="Drain every worker that answers on the app's broker."),
    # requeue
    Option("rolling", ("--rolling",), bool, False,
           help="Replace the processes a batch at a time, each only once the one before answers a ping, so the "
           "others consume all along (needs 2 or more processes)."),
    Option("max_unavailable", ("--max-unavailable",), int, None, metavar="N", min=1,
           help="With --rolling: processes replaced at once. [default: 1]"),
    Option("requeue_dry_run", ("--dry-run",), bool, False, help="Show what would be re-sent; send nothing."),
    # restart
    Option("restart_dry_run", ("--dry-run",), bool, False,
           help="Show what the restart would do (its steps, the running tasks, the kill's verdicts); touch nothing."),
    Option("restart_configuration", ("-c", "--configuration"), str, metavar="SUPERVISORD_CONF",
           help="Read supervisord's URL and credentials from this file's [supervisorctl] section, "
           f"as supervisorctl -c does. {_SUPERVISORCTL_SEARCH}"),
    Option("restart_state", ("--state",), str, metavar="FILE",
           help="Keep the savepid record here. [default: a temporary file]"),
    # deploy
    Option("configuration", ("-c", "--configuration"), str, metavar="SUPERVISORD_CONF", envvar="SUPERVISORD_CONF",
           help="supervisord's config: `supervisord -c` starts it again, and its [supervisorctl] section "
           "says where it listens. [default: supervisorctl's search, with --no-shutdown]"),
    Option("state", ("--state",), str, metavar="FILE",
           help="Keep the savepid record here. [default: a private temporary "
           "file, kept (and printed) when tasks are left to re-send or something went wrong]"),
    Option("shutdown_timeout", ("--shutdown-timeout",), float, SHUTDOWN_TIMEOUT, min=0.1, metavar="SECONDS",
           help="How long supervisord may take to shut down."),
    Option("deploy_start_timeout", ("--start-timeout",), float, START_TIMEOUT, min=0.1, metavar="SECONDS",
           help="How long supervisord and the new workers may take to answer."),
    Option("no_shutdown", ("--no-shutdown",), bool, False,
           help="Keep supervisord running (in a container it is PID 1): stop, "
           "clean up and start its worker programs only."),
    Option("no_start", ("--no-start",), bool, False, help="Do not start supervisord (or the programs) again."),
    Option("requeue", ("--requeue",), bool, False, help="Re-send the tasks the stop cut off (after the kill)."),
    # print-config
    Option("worker_program", ("--program",), str, metavar="NAME",
           help="The worker's supervisord program name. [default: APP-worker]"),
    Option("command", ("--command",), str, metavar="CMD",
           help="The worker's command line. [default: the celery beside this tool's Python, "
           "-A APP worker -l info -n NAME@%h]"),
    Option("directory", ("--directory",), str, metavar="DIR",
           help="Where -A APP is importable. [default: the current folder]"),
    Option("user", ("--user",), str, metavar="USER", help="Run the worker and the listener as USER."),
    Option("numprocs", ("--numprocs",), int, 1, metavar="N", min=1, help="How many worker processes."),
    Option("config_state_dir", ("--state-dir",), str, metavar="DIR",
           help="The listener's records. [default: /var/lib/celery-supervise/NAME]"),
    Option("log_dir", ("--log-dir",), str, metavar="DIR",
           help="Write the worker's and the listener's logs here. [default: supervisord's childlogdir]"),
    # audit
    Option("since", ("--since",), str, metavar="T",
           help="Only signals from T on: an ISO time (UTC unless it says) or an age such as 30s, 10m, 2h, 1d."),
    Option("pid", ("--pid",), int, metavar="N", min=1, help="Only the signals sent to PID N."),
    Option("contain", ("--contain",), bool, False,
           help="Run the worker through `celery-supervise contain --`: a cgroup of its own from its first "
           "instruction."),
    # listener
    Option("state_dir", ("--state-dir",), str, metavar="DIR",
           help="Where worker records and kill reports are kept (mode 0700)."),
)}

ARGUMENTS = {a.name: a for a in (
    Argument("file", "State file to write (atomically, mode 0600)."),
    Argument("kill_file", "State file written by savepid (or the old bare PID list)."),
    Argument("requeue_file", "State file written by savepid before the stop."),
    Argument("programs", "supervisord program or process names: NAME, GROUP:NAME, GROUP:*.",
             metavar="PROGRAM...", multiple=True),
    Argument("contain_command", "The worker's command line.", metavar="-- CMD...", multiple=True),
)}

#: Each verb's arguments and options (by row name), in the order of its ``--help``.
VERBS = {
    "savepid": ("file", "supervisor_url", "program", "spare", "reply_timeout", "timeout", "as_json", "cgroups"),
    "kill": ("kill_file", "grace", "spare", "dry_run", "as_json", "cgroups"),
    "status": ("supervisor_url", "program", "spare", "reply_timeout", "timeout", "as_json", "cgroups"),
    "drain": ("destination", "all_workers", "drain_timeout", "old_drain_timeout", "as_json"),
    "requeue": ("requeue_file", "journal", "requeue_dry_run", "as_json"),
    "restart": ("programs", "drain_timeout", "grace", "start_timeout", "supervisor_url", "restart_configuration",
                "restart_state", "reply_timeout", "timeout", "rolling", "max_unavailable", "restart_dry_run", "as_json"),
    "deploy": ("configuration", "supervisor_url", "program", "state", "grace", "shutdown_timeout",
               "deploy_start_timeout", "reply_timeout", "no_shutdown", "no_start", "requeue", "journal", "dry_run",
               "as_json"),
    "print-config": ("worker_program", "command", "directory", "user", "numprocs", "config_state_dir", "log_dir",
                     "contain", "as_json"),
    "audit": ("since", "pid", "as_json"),
    "listener": ("state_dir", "program", "grace", "spare", "cgroups"),
    "contain": ("contain_command", "cgroups"),
}

#: Options that must be given (typer: no default).
REQUIRED = frozenset({"state_dir"})


def row(name):
    """The option or argument row called *name*."""
    return OPTIONS.get(name) or ARGUMENTS[name]


def for_verb(verb):
    """The rows of *verb*, in order."""
    return [row(name) for name in VERBS[verb]]
