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
        self.port = _free_port()
        self.proc = None
        self.started = False

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        """Start it (again: on the same port, the one its clients know); wait until it answers.

        The port was free when it was picked, but anything may have bound it
        since (another run's redis-server above all, which picks the same
        way). The first start then moves to another free port, up to three
        times; a start again cannot, and fails saying so.
        """
        for attempt in range(3):
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
            state = wait_for(self._answers, 10, f"redis-server on port {self.port}")
            if state is True or self.started or attempt == 2:
                break
            self.port = _free_port()  # the port was taken meanwhile: a first start may move
        assert state is True, (self.dir / "redis.log").read_text()
        self.started = True
        return self

    def _answers(self):
        """True once *ours* answers; "exited" if it died (the port was taken, say).

        A ping alone is not enough: another redis-server that took the port
        answers it too, and the test would then SIGKILL a broker that is not
        the one its worker uses.
        """
        if self.proc.poll() is not None:
            return "exited"
        try:
            return self.client().info("server")["process_id"] == self.proc.pid
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
