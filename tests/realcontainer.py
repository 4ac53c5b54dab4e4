"""A container without a container runtime: a PID namespace whose PID 1 is supervisord, or tini.

``unshare --pid --fork --mount-proc`` gives a command a PID namespace of its
own, with a ``/proc`` that shows only that namespace: inside, supervisord
(or tini, with supervisord below it) is PID 1, as in a Docker or Kubernetes
container, and a process whose parent dies is re-parented to it. The file
system, the network and the host name stay the host's, so a test reaches
supervisord's socket, the broker folder and the task markers from outside.
What differs is every PID: :meth:`Container.host_pid` and
:meth:`Container.ns_pid` translate (``NSpid`` in ``/proc/PID/status``).
Commands run inside through ``nsenter``, as ``kubectl exec`` or ``docker
exec`` would run them.

Cleanup is by PID. The namespace ends when its PID 1 exits (the kernel then
SIGKILLs whatever is left in it), which :meth:`Container.stop` brings about
through supervisord's own shutdown or, should that fail, by SIGKILLing
``unshare``, whose ``--kill-child`` SIGKILLs PID 1. ``unshare`` itself
ignores SIGTERM while it waits. Every process inside carries the test run's
environment marker, like any other, so the leak guard finds one that
outlives its namespace and kills it by its host PID.
"""

import os
import shutil
import subprocess

import psutil

from realprocs import wait_for
from realsupervisor import BIN, Supervisord

#: A PID namespace of its own, its own /proc; PID 1 dies if unshare does.
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def ns_pids(pid):
    """``NSpid`` of host process *pid*: its PID in each namespace, the host's first, its own last."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    raise ValueError(f"no NSpid in /proc/{pid}/status")


def pid_namespace(pid):
    return os.readlink(f"/proc/{pid}/ns/pid")


def require_tini():
    """tini's path; a test that needs it fails (never skips) without it."""
    path = shutil.which("tini")
    if path is None:
        raise AssertionError("tini is not installed: `apt-get install tini` (.ci/run installs it when run as root)")
    return path


class Namespace:
    """A PID namespace, known by its PID 1 (*init*, a host process): PIDs translated, commands run inside."""

    def __init__(self, init, env):
        self.init = init
        self.env = env
        assert ns_pids(init.pid)[-1] == 1, ns_pids(init.pid)
        self._ns = pid_namespace(init.pid)

    @classmethod
    def of(cls, unshare, env):
        """The namespace that ``unshare --fork`` (a host process) made for its child."""
        init = wait_for(lambda: psutil.Process(unshare.pid).children(), 10, "unshare to fork PID 1")[0]
        return cls(init, env)

    def ns_pid(self, host_pid):
        """The PID that host process *host_pid* has inside."""
        if pid_namespace(host_pid) != self._ns:
            raise AssertionError(f"host PID {host_pid} is not in the namespace")
        return ns_pids(host_pid)[-1]

    def host_pid(self, ns_pid):
        """The host's PID of the process *ns_pid* inside."""
        for pid in psutil.pids():
            try:
                if ns_pids(pid)[-1] == ns_pid and pid_namespace(pid) == self._ns:
                    return pid
            except (OSError, ValueError):
                continue  # exited meanwhile
        raise LookupError(f"no process {ns_pid} in the namespace")

    def host_process(self, ns_pid):
        return psutil.Process(self.host_pid(ns_pid))

    def inside(self, argv, *, cwd, timeout=90):
        """Run *argv* inside (its PID namespace and /proc), from *cwd*; the CompletedProcess."""
        return subprocess.run(
            ["nsenter", "-t", str(self.init.pid), "-p", "-m", f"--wd={cwd}", "--", *argv],
            env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )


class Container(Supervisord):
    """A :class:`realsupervisor.Supervisord` that is PID 1 of a PID namespace (or the child of *init* there).

    *init* is a command line put before supervisord's inside the namespace,
    e.g. ``[tini, "--"]``: then tini is PID 1 and supervisord PID 2.
    ``proc`` is ``unshare`` (in the host's namespace); ``init`` is the
    namespace's PID 1 as the host sees it, once started.
    """

    def __init__(self, directory, *, init=(), **options):
        super().__init__(directory, **options)
        self.init_argv = list(init)
        self.namespace = None

    @property
    def init(self):
        return self.namespace.init

    def command(self):
        return [*UNSHARE, *self.init_argv, *super().command()]

    def start(self):
        super().start()
        self.namespace = Namespace.of(self.proc, self.env)
        return self

    def ns_pid(self, host_pid):
        return self.namespace.ns_pid(host_pid)

    def host_pid(self, ns_pid):
        return self.namespace.host_pid(ns_pid)

    def host_process(self, ns_pid):
        return self.namespace.host_process(ns_pid)

    def supervisord(self):
        """supervisord as the host sees it (PID 1 inside, or tini's child)."""
        return self.host_process(self.rpc.supervisor.getPID())

    def celery_supervise(self, *args, cwd, timeout=90):
        """``celery-supervise ARGS`` run inside the container."""
        return self.namespace.inside([str(BIN / "celery-supervise"), *args], cwd=cwd, timeout=timeout)
