"""A real supervisord running the demo's Celery worker, for end-to-end tests.

:class:`Supervisord` writes a config into a temporary folder, starts
``supervisord -n`` as pytest's own child, talks to it over XML-RPC on its
unix socket, and always shuts it down.  :class:`DemoClient` sends the demo
project's tasks through the same guarded filesystem broker the worker uses.
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import xmlrpc.client
from pathlib import Path

import psutil
from celery import Celery
from supervisor.xmlrpc import SupervisorTransport

from celery_supervise.celery_side.fs_transport import TRANSPORT_PATH, filesystem_broker_options
from realprocs import WaitTimeout, reap, wait_for, wait_gone

REPO = Path(__file__).resolve().parent.parent
DJANGO_APP = REPO / "django_app"
BIN = Path(sys.executable).parent

#: Name of the worker program in the generated config.
PROGRAM = "celery-worker"

#: supervisord has to answer XML-RPC this soon after it starts.
START_TIMEOUT = 20.0
#: Every worker has to answer a ping this soon after supervisord answers.
READY_TIMEOUT = 45.0

CONFIG_TEMPLATE = """\
[unix_http_server]
file={socket}

[supervisord]
logfile=%(here)s/supervisord.log
pidfile=%(here)s/supervisord.pid
childlogdir=%(here)s
loglevel=info
nodaemon={nodaemon}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{socket}

[program:{program}]
command={celery} -A demo worker -l info -c {concurrency} -n {node_prefix}%(process_num)d@%%h{queues}
directory={directory}
process_name=%(program_name)s_%(process_num)d
numprocs={numprocs}
autostart=true
autorestart={autorestart}
startsecs=1
startretries=0
stopsignal={stopsignal}
stopwaitsecs={stopwaitsecs}
stopasgroup=false
killasgroup=false
redirect_stderr=true
stdout_logfile=%(here)s/%(program_name)s_%(process_num)d.log
{priority}
{extra}
"""


HOST_CONFIG = """\
[unix_http_server]
file={socket}

[supervisord]
logfile=%(here)s/supervisord.log
pidfile=%(here)s/supervisord.pid
childlogdir=%(here)s
loglevel=info
nodaemon={nodaemon}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{socket}

[include]
files = {include}
"""


def host_config(include, nodaemon=True):
    """``config=`` for :class:`Supervisord`: a host's own part, including the files *include* names.

    The way a user's supervisord.conf includes ``conf.d/*.conf``; *include*
    is a glob (absolute, or relative to the config's folder).
    """
    return lambda socket: HOST_CONFIG.format(socket=socket, include=include,
                                             nodaemon="true" if nodaemon else "false")


def listener_section(exe, grace, directory, name="celery-supervise", **options):
    """An ``[eventlistener:NAME]`` section running ``celery-supervise listener``.

    The settings of ``conf/supervisord.conf`` (state in ``%(here)s/state``,
    priority 100, below the worker's), with the listener's stderr in
    ``%(here)s/listener.log``; *options* override or add settings.
    """
    settings = {
        "command": f"{exe} -A demo listener --state-dir %(here)s/state --grace {grace}",
        "directory": directory,
        "events": "PROCESS_STATE,SUPERVISOR_STATE_CHANGE,TICK_60",
        "priority": 100,
        "autostart": "true",
        "autorestart": "true",
        "startsecs": 1,
        "stopwaitsecs": 30,
        "buffer_size": 50,
        "stdout_logfile": "NONE",
        "stderr_logfile": "%(here)s/listener.log",
        **options,
    }
    return f"\n[eventlistener:{name}]\n" + "".join(f"{key}={value}\n" for key, value in settings.items())


def copy_project(dest):
    """Copy the demo project (``django_app/`` without ``var/``) to `dest`; return it.

    A worker run from the copy belongs to another project as far as
    celery-supervise can tell: a scan tells projects apart by the folder
    their package is imported from.  So a test whose worker runs from its
    own copy never records, nor kills, the worker of another test running
    at the same time.
    """
    shutil.copytree(DJANGO_APP, dest, ignore=shutil.ignore_patterns("var", "__pycache__"))
    return Path(dest)


class SupervisordFailed(AssertionError):
    """supervisord or a worker under it died or did not come up."""


def _find_executable(name):
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither in {BIN} nor on PATH")
    return found


def _tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return "(no such file)\n"


class Supervisord:
    """One supervisord, started with :meth:`start` and ended with :meth:`stop`.

    Attributes: ``dir`` (its folder: config, logs, broker, task markers),
    ``conf_path``, ``pid``, ``rpc`` (an XML-RPC proxy), ``celery`` (a
    :class:`DemoClient`), ``marker_dir`` and ``numprocs``.

    `project_dir` is the folder the worker runs from (default
    ``django_app/``; see :func:`copy_project`), `broker_dir` its broker
    folder (default ``dir/broker``). `queues` is the worker's ``-Q`` value
    (``%(process_num)d`` may appear in it), `node_prefix` the start of its
    node name (``<prefix><N>@<host>``): a broker server that other tests
    share needs both unique per test. With ``nodaemon=False`` the config
    says ``nodaemon=false``, so that ``supervisord -c`` run by a script
    daemonizes; :meth:`stop` also shuts down such a daemon (see
    :meth:`daemon`).
    """

    def __init__(self, directory, *, stopsignal="TERM", stopwaitsecs=30, numprocs=1,
                 concurrency=2, extra="", broker_url=None, autorestart=False, priority=None,
                 env=None, project_dir=None, broker_dir=None, nodaemon=True,
                 own_queues=False, queues=None, node_prefix="demo", config=None, bin_dir=None):
        self.dir = Path(directory)
        #: The Django project the worker runs from (its ``directory=``).
        self.project_dir = Path(project_dir or DJANGO_APP)
        self.stopsignal = stopsignal
        self.stopwaitsecs = stopwaitsecs
        self.numprocs = numprocs
        self.node_prefix = node_prefix
        self.broker_dir = Path(broker_dir or self.dir / "broker")
        self.marker_dir = self.dir / "markers"
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        # AF_UNIX paths are limited to 107 bytes, which pytest's tmp_path for
        # a long test name can exceed: keep the socket in a short folder.
        self._socket_dir = tempfile.mkdtemp(prefix="csup-")
        self.socket = os.path.join(self._socket_dir, "supervisor.sock")
        self.conf_path = self.dir / "supervisord.conf"
        #: Where supervisord and supervisorctl are (another virtualenv's, for the wheel test).
        self.bin_dir = Path(bin_dir) if bin_dir else None
        if config is not None:
            self.conf_path.write_text(config(self.socket))
        else:
            self.conf_path.write_text(CONFIG_TEMPLATE.format(
                socket=self.socket,
                program=PROGRAM,
                celery=_find_executable("celery"),
                concurrency=concurrency,
                directory=self.project_dir,
                numprocs=numprocs,
                stopsignal=stopsignal,
                stopwaitsecs=stopwaitsecs,
                autorestart="true" if autorestart else "false",
                # Each process also consumes a queue of its own, worker<N>, so a
                # test can choose which process runs a task.
                queues=f" -Q {queues}" if queues else " -Q celery,worker%(process_num)d" if own_queues else "",
                node_prefix=node_prefix,
                priority="" if priority is None else f"priority={priority}",
                extra=textwrap.dedent(extra),
                # start() always passes -n; with nodaemon=false in the file, a
                # plain `supervisord -c FILE` (as scripts/deploy.sh runs it) daemonizes.
                nodaemon="true" if nodaemon else "false",
            ))
        #: The workers' task journal (demo/settings.py reads the variable).
        self.journal_dir = self.dir / "journal"
        self.env = dict(os.environ, CELERY_SUPERVISE_BROKER_DIR=str(self.broker_dir),
                        CELERY_SUPERVISE_JOURNAL_DIR=str(self.journal_dir), **(env or {}))
        if broker_url:
            self.env["CELERY_BROKER_URL"] = broker_url
        self.celery = DemoClient(self.broker_dir, self.marker_dir, broker_url=broker_url)
        self.proc = None
        self.rpc = None
        #: More log files (relative to ``dir``) for :meth:`diagnostics` to show.
        self.extra_logs = []

    def executable(self, name):
        return str(self.bin_dir / name) if self.bin_dir else _find_executable(name)

    @property
    def pid(self):
        return self.proc.pid

    def command(self):
        """How :meth:`start` runs supervisord (in the foreground: ``-n``)."""
        return [self.executable("supervisord"), "-n", "-c", str(self.conf_path)]

    def start(self):
        """Start supervisord and wait until it answers XML-RPC."""
        # Appended to: a test may start supervisord again in the same folder.
        output = open(self.dir / "supervisord.output", "ab")
        with output:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                cwd=self.dir, env=self.env,
            )
        transport = SupervisorTransport(serverurl="unix://" + self.socket)
        self.rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

        def answers():
            self._check_alive()
            try:
                return self.rpc.supervisor.getState()["statename"] == "RUNNING"
            except (OSError, http.client.HTTPException):
                # No socket yet, or nobody listening yet.  The transport
                # keeps its connection, which is unusable after a failure.
                transport.close()
                return False

        wait_for(answers, START_TIMEOUT, f"supervisord (pid {self.pid}) to answer XML-RPC")
        return self

    def wait_ready(self, timeout=READY_TIMEOUT):
        """Wait until every worker process is RUNNING and answers a ping."""

        def ready():
            self._check_alive()
            for info in self.rpc.supervisor.getAllProcessInfo():
                if info["statename"] in ("BACKOFF", "EXITED", "FATAL"):
                    raise SupervisordFailed(
                        f"{info['name']} is {info['statename']} ({info['description']})\n"
                        + self.diagnostics()
                    )
            return len(self.celery.ping()) >= self.numprocs

        wait_for(ready, timeout, f"{self.numprocs} Celery worker(s) to answer a ping", interval=0.1)

    def node_names(self):
        """The worker node names, ``<node_prefix><N>@<host>``, one per process."""
        return [f"{self.node_prefix}{n}@{socket.gethostname()}" for n in range(self.numprocs)]

    def wait_nodes(self, timeout=READY_TIMEOUT):
        """Wait until every one of :meth:`node_names` answers a ping.

        Stricter than :meth:`wait_ready` on a broker server other workers
        may share: it waits for these nodes, not for any answer.
        """
        try:
            self.wait_ready(timeout)
            wait_for(lambda: set(self.node_names()) <= set(self.celery.ping()), timeout,
                     f"{self.node_names()} to answer a ping", interval=0.1)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}\n{self.diagnostics()}") from None

    def worker_pids(self):
        """PIDs of the worker main processes, as supervisord reports them."""
        return [info["pid"] for info in self.rpc.supervisor.getAllProcessInfo() if info["pid"]]

    def group_pids(self, group=PROGRAM):
        """PIDs of the running processes of one program (group), by process name."""
        return {info["name"]: info["pid"] for info in self.rpc.supervisor.getAllProcessInfo()
                if info["group"] == group and info["pid"]}

    def states(self):
        """``{"group:name": statename}`` of every process."""
        return {f"{info['group']}:{info['name']}": info["statename"]
                for info in self.rpc.supervisor.getAllProcessInfo()}

    def ctl(self, *args, timeout=60):
        """Run ``supervisorctl -c <conf> *args`` and return the CompletedProcess."""
        return subprocess.run(
            [self.executable("supervisorctl"), "-c", str(self.conf_path), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            env=self.env,
        )

    def log(self, name="supervisord"):
        """Text of the log ``name``: ``supervisord`` or a process name."""
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def wait_exit(self, timeout):
        """Wait for supervisord to exit; return its exit code."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SupervisordFailed(
                f"supervisord (pid {self.pid}) still running after {timeout} s\n" + self.diagnostics()
            ) from None

    def stop(self):
        """Shut supervisord down through XML-RPC; kill it if that fails.

        Whatever it leaves behind is the leak guard's business.
        """
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.rpc.supervisor.shutdown()
                except (OSError, xmlrpc.client.Error):
                    pass  # dying already, or not answering: killed below
                try:
                    # stops the processes in parallel, each within stopwaitsecs
                    self.proc.wait(timeout=self.stopwaitsecs + 20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.stop_daemon()
        finally:
            self.celery.close()
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def proxy(self):
        """A new XML-RPC proxy on the socket, for whichever supervisord listens there now."""
        transport = SupervisorTransport(serverurl="unix://" + self.socket)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def daemon(self):
        """The supervisord answering on the socket, if it is not :attr:`proc`, else ``None``.

        ``scripts/deploy.sh`` starts supervisord again with ``supervisord -c
        FILE``, which daemonizes (with ``nodaemon=False``): that one is
        nobody's child here, so it is found through its socket.
        """
        try:
            pid = self.proxy().supervisor.getPID()
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            return None  # nobody listening
        if self.proc is not None and pid == self.proc.pid:
            return None
        try:
            return psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None

    def stop_daemon(self):
        """Shut down :meth:`daemon`, if there is one; kill it by PID if it will not exit."""
        daemon = self.daemon()
        if daemon is None:
            return
        try:
            self.proxy().supervisor.shutdown()
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            pass  # killed below
        if wait_gone([daemon], self.stopwaitsecs + 20):
            reap([daemon])

    def diagnostics(self):
        """supervisord's exit code and the tails of its and the workers' logs."""
        parts = []
        if self.proc is not None and self.proc.poll() is not None:
            parts.append(f"supervisord exited with {self.proc.returncode}")
        parts.append("--- supervisord output ---\n" + _tail(self.dir / "supervisord.output"))
        parts.append("--- supervisord.log ---\n" + _tail(self.dir / "supervisord.log"))
        for path in sorted(self.dir.glob(f"{PROGRAM}_*.log")):
            parts.append(f"--- {path.name} ---\n" + _tail(path))
        for name in self.extra_logs:
            parts.append(f"--- {name} ---\n" + _tail(self.dir / name))
        return "\n".join(parts)

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise SupervisordFailed(f"supervisord (pid {self.pid}) died early\n" + self.diagnostics())


class DemoClient:
    """Sends the demo project's tasks to the worker(s) and awaits their markers."""

    def __init__(self, broker_dir, marker_dir, broker_url=None):
        self.marker_dir = Path(marker_dir)
        self.app = Celery("celery-supervise-tests", set_as_current=False)
        if broker_url:
            self.app.conf.broker_url = broker_url
        else:
            self.app.conf.update(
                broker_url="filesystem://",
                broker_transport=TRANSPORT_PATH,
                broker_transport_options=filesystem_broker_options(broker_dir),
            )
        self.app.conf.task_ignore_result = True

    def ping(self, timeout=0.5):
        """Names of the workers that answered a ping within `timeout`."""
        replies = self.app.control.ping(timeout=timeout)
        return sorted(name for reply in replies for name in reply)

    def spawn_family(self, hold=60, lifetime=120, queue=None):
        """Send ``demo.tasks.spawn_family`` (to `queue`, e.g. ``worker1``); return the task id."""
        result = self.app.send_task(
            "demo.tasks.spawn_family",
            kwargs={"marker_dir": str(self.marker_dir), "hold": hold, "lifetime": lifetime},
            queue=queue,
        )
        return result.id

    def mark(self, hold=0.0, queue=None, gate=None):
        """Send ``demo.tasks.mark`` (to `queue`); return the task id.

        With a `gate` file, the task holds until that file is removed (at
        most `hold` seconds).
        """
        kwargs = {"marker_dir": str(self.marker_dir), "hold": hold}
        if gate is not None:
            kwargs["gate"] = str(gate)
        result = self.app.send_task("demo.tasks.mark", kwargs=kwargs, queue=queue)
        return result.id

    def mark_record(self, task_id, stage):
        """What ``mark`` wrote at `stage` (``started`` or ``done``), or ``None`` if not yet."""
        try:
            return json.loads((self.marker_dir / f"{task_id}.{stage}").read_text())
        except FileNotFoundError:
            return None

    def wait_for_mark(self, task_id, stage, timeout=30.0):
        """Wait for the `stage` marker of a ``mark`` task and return it."""
        return wait_for(lambda: self.mark_record(task_id, stage), timeout, f"{stage} marker of mark task {task_id}")

    def wait_for_marker(self, task_id, timeout=30.0):
        """Wait for the marker file of `task_id` and return its content."""
        path = self.marker_dir / f"{task_id}.json"
        wait_for(path.exists, timeout, f"marker {path} of spawn_family")
        return json.loads(path.read_text())

    def close(self):
        self.app.close()
