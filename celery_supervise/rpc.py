"""supervisord's XML-RPC interface, through supervisor's own transport.

``supervisor.xmlrpc.SupervisorTransport`` speaks both ``unix://`` and
``http://`` server URLs, exactly as supervisorctl does.
"""

from __future__ import annotations

import fnmatch
import socket
import xmlrpc.client
from dataclasses import dataclass

from .errors import SupervisorError

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
    except (OSError, socket.error, xmlrpc.client.ProtocolError) as exc:
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
    found = []
    for info in infos:
        name = full_name(info)
        if patterns and not any(
            fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(info.get("name", ""), pat) for pat in patterns
        ):
            continue
        if info.get("statename") in RUNNING_STATES and info.get("pid"):
            found.append(ProgramProcess(name, int(info["pid"]), info["statename"]))
    return int(sup_pid), found
