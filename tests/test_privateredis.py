"""The fault tests' private redis-server: it never takes another redis-server for its own.

Its port is picked free, then bound later by redis-server; anything may
take it in between (another run's private redis-server picks the same
way). A ping then answered from the other server, and a test meant to
SIGKILL its broker killed nothing it used.
"""

import pytest

from privateredis import PrivateRedis


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.stop()


def test_a_first_start_on_a_taken_port_moves_to_a_free_one(tmp_path, servers):
    first = PrivateRedis(tmp_path / "first").start()
    servers.append(first)
    second = PrivateRedis(tmp_path / "second")
    second.port = first.port  # as if the first had been started on it after the second picked it
    servers.append(second.start())
    assert second.port != first.port
    assert second.client().info("server")["process_id"] == second.proc.pid
    assert first.client().info("server")["process_id"] == first.proc.pid


def test_a_start_again_on_a_taken_port_fails_and_says_why(tmp_path, servers):
    """Its clients know its port: a broker back on another one would be a different broker."""
    ours = PrivateRedis(tmp_path / "ours").start()
    servers.append(ours)
    ours.kill()
    taker = PrivateRedis(tmp_path / "taker")
    taker.port = ours.port
    servers.append(taker.start())
    with pytest.raises(AssertionError, match="Address already in use"):
        ours.start()
    assert ours.proc.poll() is not None
    assert taker.client().ping()
