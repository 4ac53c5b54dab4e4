"""The broker servers the e2e tests share with other runs, and how to tidy up after one test.

Redis and RabbitMQ may serve several test runs at once, so a test uses
queue and node names of its own (containing its ``uid``) and removes only
what carries that ``uid``.
"""

import socket

import pytest

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def clean_redis(url, uid):
    """Remove the keys of the test `uid` from the Redis db at `url`: its queues and kombu bindings."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        for key in client.scan_iter(match=f"*{uid}*"):
            client.delete(key)
        for key in client.scan_iter(match="_kombu.binding.*"):
            mine = [m for m in client.sscan_iter(key) if uid.encode() in m]
            if mine:
                client.srem(key, *mine)
    finally:
        client.close()


def delete_rabbitmq_queues(*names):
    from kombu import Connection

    with Connection(RABBITMQ_URL, connect_timeout=5) as conn:
        for name in names:
            with conn.channel() as channel:
                channel.queue_delete(name)


def require(url):
    """Fail at once, and say why, when a required broker server is not listening."""
    from kombu.utils.url import url_to_parts

    parts = url_to_parts(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"{parts.scheme} broker at {parts.hostname}:{parts.port} is unreachable ({exc}); "
                    "the e2e tests need it (see .ci/run)", pytrace=False)
