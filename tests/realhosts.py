"""Simulated hosts on one machine: a UTS, PID and mount namespace each, all on one broker.

A :class:`Host` is a :class:`realcontainer.Container` that also has a host
name of its own: ``unshare --uts --pid --fork --mount --mount-proc`` runs
``sh -c 'hostname NAME && exec supervisord ...'``, so supervisord is PID 1
of a namespace where ``hostname`` (and so Celery's ``%h`` and the state
files' ``host``) says NAME. The network namespace is the machine's, so
every host reaches one Redis on loopback, as a fleet reaches one broker;
the file system is the machine's too (the mount namespace only gives each
host its own ``/proc``), so the test reads every host's logs, records and
task markers directly.

Commands run inside through ``nsenter -u -p -m``: the host's name, its
PIDs and its ``/proc``, as ``ssh host celery-supervise ...`` would run them.
"""

import subprocess

from realcontainer import Container
from realsupervisor import BIN

#: The namespaces one simulated host has of its own; PID 1 dies if unshare does.
UNSHARE_HOST = ["unshare", "--uts", "--pid", "--fork", "--mount", "--mount-proc", "--kill-child"]
#: Sets the host name inside, then becomes supervisord (PID 1): ``$0`` is the name.
SET_HOSTNAME = ["sh", "-c", 'hostname "$0" && exec "$@"']


class Host(Container):
    """One simulated host: supervisord as PID 1 of its namespaces, with host name *hostname*."""

    def __init__(self, directory, hostname, **options):
        super().__init__(directory, **options)
        self.hostname = hostname

    def command(self):
        # Container.command() would unshare the PID namespace only.
        return [*UNSHARE_HOST, *SET_HOSTNAME, self.hostname, *super(Container, self).command()]

    def node_names(self):
        return [f"{self.node_prefix}{n}@{self.hostname}" for n in range(self.numprocs)]

    def inside(self, argv, *, cwd, timeout=90):
        """Run *argv* in this host's namespaces (host name, PIDs, /proc), from *cwd*."""
        return subprocess.run(
            ["nsenter", "-t", str(self.init.pid), "-u", "-p", "-m", f"--wd={cwd}", "--", *argv],
            env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )

    def celery_supervise(self, *args, cwd, timeout=90):
        return self.inside([str(BIN / "celery-supervise"), *args], cwd=cwd, timeout=timeout)
