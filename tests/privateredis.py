"""A private ``redis-server`` for the faults that kill the broker (tests and the chaos soak).

It keeps an append-only file fsynced on every write, so that what it
acknowledged before a SIGKILL is still there when it starts again.
"""

import signal
import socket
import subprocess

from realprocs import wait_for


class PrivateRedis:
    """One redis-server of this test's own, on a free port, in its own folder."""

    def __init__(self, directory):
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(self._answers, 10, f"redis-server on port {self.port}")
        return self

    def _answers(self):
        assert self.proc.poll() is None, (self.dir / "redis.log").read_text()
        try:
            return self.client().ping()
        except Exception:
            return False

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def kill(self):
        """SIGKILL, by PID: the broker dies mid-operation."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
