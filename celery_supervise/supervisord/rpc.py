"""supervisord's XML-RPC interface, through supervisor's own transport.

``supervisor.xmlrpc.SupervisorTransport`` speaks both ``unix://`` and
``http://`` server URLs, exactly as supervisorctl does.
"""

from __future__ import annotations

import fnmatch
import http.client
import socket
import xmlrpc.client
from dataclasses import dataclass

from ..errors import SupervisorError

RUNNING_STATES = {"STARTING", "RUNNING", "BACKOFF", "STOPPING"}


@dataclass(frozen=True)
class ProgramProcess:
    name: str  # "group:name", as supervisorctl shows it
    pid: int
    state: str


def connect(url: str, username: str | None = None, password: str | None = None):
    # Imported here: supervisor's XML-RPC stack costs ~60 ms to import, and
    # most runs (kill, savepid with -A) never talk to supervisord.
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(username, password, url)
    # The host part is ignored by SupervisorTransport for unix:// URLs.
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def call(url: str, what, *args):
    """Call ``what(*args)``, translating every transport failure once."""
    try:
        return what(*args)
    except xmlrpc.client.Fault as exc:
        raise SupervisorError(url, f"fault {exc.faultCode}: {exc.faultString}") from None
    except (OSError, socket.error, xmlrpc.client.ProtocolError, http.client.HTTPException) as exc:
        raise SupervisorError(url, f"not reachable ({exc})") from None


def full_name(info: dict) -> str:
    group, name = info.get("group"), info.get("name")
    return name if group == name else f"{group}:{name}"


def program_processes(url: str, patterns: list[str], username=None, password=None) -> tuple[int, list[ProgramProcess]]:
    """supervisord's own PID and its running processes matching *patterns*.

    A pattern is a shell glob matched against ``group:name`` and ``name``.
    """
    proxy = connect(url, username, password)
    sup_pid = call(url, proxy.supervisor.getPID)
    infos = call(url, proxy.supervisor.getAllProcessInfo)
    return int(sup_pid), running_processes(infos, patterns)


def matches(info: dict, patterns) -> bool:
    """Whether a process (``getProcessInfo``) matches one of the glob *patterns* (all, if none).

    A pattern is matched against ``group:name`` and against ``name``.
    """
    name = full_name(info)
    return not patterns or any(
        fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(info.get("name", ""), pat) for pat in patterns)


def running_processes(infos: list[dict], patterns=()) -> list[ProgramProcess]:
    """The processes of *infos* matching *patterns* that are running (they have a PID)."""
    return [ProgramProcess(full_name(info), int(info["pid"]), info["statename"]) for info in infos
            if matches(info, patterns) and info.get("statename") in RUNNING_STATES and info.get("pid")]


# ------------------------------------------------------------------- restart

#: supervisor's own fault codes (``supervisor.xmlrpc.Faults``), without importing it.
FAULT_NOT_RUNNING = 70
FAULT_ALREADY_STARTED = 60


@dataclass(frozen=True)
class Server:
    """Where supervisord listens, and how to log in, as supervisorctl would find it."""

    url: str
    username: str | None = None
    password: str | None = None
    source: str = "--supervisor-url"  # or the config file it was read from

    def proxy(self):
        return connect(self.url, self.username, self.password)


def find_server(url: str | None = None, config: str | None = None) -> Server:
    """supervisord's URL and credentials, the way supervisorctl finds them.

    An explicit *url* (``--supervisor-url`` or ``SUPERVISOR_SERVER_URL``)
    wins; credentials then come from *config* only when one is named.
    Otherwise the ``[supervisorctl]`` section of *config*, or of the first
    file of supervisorctl's default search (``supervisord.conf``,
    ``etc/supervisord.conf``, ``/etc/supervisord.conf``,
    ``/etc/supervisor/supervisord.conf``…), read by supervisor's own
    :class:`supervisor.options.ClientOptions`, so ``%(here)s``,
    ``%(ENV_X)s`` and relative socket paths mean what they mean there.
    """
    if url and not config:
        return Server(url)
    from supervisor.options import ClientOptions

    options = ClientOptions()

    def usage(message):  # ClientOptions would print it and exit(2)
        raise SupervisorError(config or "supervisorctl's default config", " ".join(str(message).split()))

    options.usage = usage
    args = ["-c", config] if config else []
    if url:
        args += ["-s", url]
    options.realize(args=args, progname="celery-supervise")
    source = "--supervisor-url" if url else (options.configfile or "supervisorctl's default URL")
    return Server(options.serverurl, options.username, options.password, source)


def all_process_info(server: Server) -> list[dict]:
    """``supervisor.getAllProcessInfo()``; :class:`SupervisorError` when unreachable."""
    return call(server.url, server.proxy().supervisor.getAllProcessInfo)


def expand_names(names, infos: list[dict]) -> list[str]:
    """The name of every process *names* mean, in order, once each.

    Names come back as supervisorctl shows them: ``group:name``, or just
    ``name`` for a process alone in a group of its own name.

    As supervisorctl understands a name, and a little kinder: ``group:*``
    is every process of the group, ``group:name`` one process, and a bare
    name is a whole group (``celery-worker`` for ``celery-worker:*``) or
    else the one process of that name. An unknown name is an error before
    anything is touched.
    """
    by_group: dict[str, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    exact: dict[str, str] = {}
    for info in infos:
        full = full_name(info)  # "name" when the group is its one program's, as supervisorctl shows it
        by_group.setdefault(info["group"], []).append(full)
        by_name.setdefault(info["name"], []).append(full)
        exact[f"{info['group']}:{info['name']}"] = full
    out: list[str] = []
    unknown = []
    for name in names:
        group, sep, proc = name.partition(":")
        if sep and proc == "*":
            found = by_group.get(group, [])
        elif sep:
            found = [exact[name]] if name in exact else []
        else:
            found = by_group.get(name) or by_name.get(name, [])
            if len(found) > 1 and name not in by_group:
                raise SupervisorError("supervisord", f"{name!r} names processes of several groups "
                                      f"({', '.join(found)}); say group:name")
        if not found:
            unknown.append(name)
        out.extend(f for f in found if f not in out)
    if unknown:
        known = ", ".join(sorted({f"{i['group']}:*" for i in infos})) or "none"
        raise SupervisorError("supervisord", f"no such program or process: {', '.join(unknown)} (known: {known})")
    return out


def stop_process(server: Server, name: str) -> bool:
    """``stopProcess(name, wait=True)``: returns once it has exited; ``False`` if it was not running."""
    try:
        server.proxy().supervisor.stopProcess(name, True)
    except xmlrpc.client.Fault as exc:
        if exc.faultCode == FAULT_NOT_RUNNING:
            return False
        raise SupervisorError(server.url, f"stopProcess({name}): fault {exc.faultCode}: {exc.faultString}") from None
    except (OSError, xmlrpc.client.ProtocolError) as exc:
        raise SupervisorError(server.url, f"not reachable ({exc})") from None
    return True


def start_process(server: Server, name: str) -> int:
    """``startProcess(name, wait=True)`` (RUNNING after ``startsecs``); return its PID."""
    proxy = server.proxy()
    try:
        proxy.supervisor.startProcess(name, True)
    except xmlrpc.client.Fault as exc:
        if exc.faultCode != FAULT_ALREADY_STARTED:
            raise SupervisorError(server.url, f"startProcess({name}): fault {exc.faultCode}: {exc.faultString}") from None
    except (OSError, xmlrpc.client.ProtocolError) as exc:
        raise SupervisorError(server.url, f"not reachable ({exc})") from None
    return int(call(server.url, proxy.supervisor.getProcessInfo, name)["pid"])
