"""The guarded filesystem transport, with real kombu connections.

kombu issue #1551: the stock transport creates the message file in the
data folder and only then writes it, so a consumer can read it empty.
"""

import json
import os
import threading
import time

import kombu
import pytest
from kombu.transport import filesystem as stock_filesystem

from celery_supervise.celery_side import fs_transport
from celery_supervise.celery_side.fs_transport import filesystem_broker_options

#: Big enough that writing one takes a while, small enough to stay lean.
LARGE_BODY = "x" * (512 * 1024)


class Kombu1551Reader(threading.Thread):
    """Read every message file in a folder, over and over, without consuming.

    Records each file it could open but not parse as JSON: exactly what a
    consumer hits in kombu issue #1551.
    """

    def __init__(self, folder):
        super().__init__(daemon=True)
        self.folder = folder
        self.stop = threading.Event()
        self.complete = set()
        self.partial = []

    def run(self):
        while not self.stop.is_set():
            for name in os.listdir(self.folder):
                if not name.endswith(".msg"):
                    continue
                try:
                    with open(os.path.join(self.folder, name), "rb") as f:
                        raw = f.read()
                except FileNotFoundError:
                    continue
                try:
                    json.loads(raw)
                except ValueError:
                    self.partial.append((name, len(raw)))
                else:
                    self.complete.add(name)


@pytest.fixture
def kombu_1551_reader(tmp_path):
    """Start a :class:`Kombu1551Reader` on ``tmp_path/broker/data``; stop it after."""
    options = filesystem_broker_options(tmp_path / "broker")
    reader = Kombu1551Reader(options["data_folder_in"])
    reader.start()
    yield options, reader
    reader.stop.set()
    reader.join(timeout=10)


def connect(transport, options):
    return kombu.Connection("filesystem://", transport=transport, transport_options=options)


def test_broker_options_create_the_folders(tmp_path):
    options = filesystem_broker_options(tmp_path / "b")

    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "b" / "data")
    assert options["control_folder"] == str(tmp_path / "b" / "control")
    assert options["polling_interval"] == 0.05
    assert (tmp_path / "b" / "data").is_dir()
    assert (tmp_path / "b" / "control").is_dir()


def test_messages_round_trip_in_order(tmp_path):
    options = filesystem_broker_options(tmp_path)
    with connect(fs_transport.Transport, options) as conn:
        queue = conn.SimpleQueue("round-trip")
        for i in range(20):
            queue.put({"i": i})
            # kombu orders by a millisecond timestamp in the file name
            time.sleep(0.002)
        received = []
        for _ in range(20):
            message = queue.get(timeout=5)
            received.append(message.payload["i"])
            message.ack()
        queue.close()

    assert received == list(range(20))
    assert os.listdir(options["data_folder_in"]) == []
    assert os.listdir(options["data_folder_in"] + ".staging") == []


def test_queues_stay_apart(tmp_path):
    options = filesystem_broker_options(tmp_path)
    with connect(fs_transport.Transport, options) as conn:
        first, second = conn.SimpleQueue("first"), conn.SimpleQueue("second")
        first.put("for first")
        second.put("for second")

        assert second.get(timeout=5).payload == "for second"
        assert first.get(timeout=5).payload == "for first"
        first.close()
        second.close()


def test_message_is_outside_the_data_folder_until_it_is_complete(tmp_path, monkeypatch):
    """When the bytes reach the disk, the data folder still lacks the file."""
    options = filesystem_broker_options(tmp_path)
    data = options["data_folder_out"]
    seen_at_fsync = []
    real_fsync = os.fsync

    def fsync_and_look(fd):
        real_fsync(fd)
        staged = os.readlink(f"/proc/self/fd/{fd}")
        seen_at_fsync.append((os.path.basename(staged), os.path.getsize(staged), os.listdir(data)))

    monkeypatch.setattr(fs_transport.os, "fsync", fsync_and_look)
    with connect(fs_transport.Transport, options) as conn:
        queue = conn.SimpleQueue("look")
        queue.put(LARGE_BODY)
        monkeypatch.undo()
        assert queue.get(timeout=5).payload == LARGE_BODY
        queue.close()

    [(name, size, listing)] = seen_at_fsync
    assert size > len(LARGE_BODY)
    assert name not in listing


def test_reader_never_sees_a_partial_message(kombu_1551_reader):
    options, reader = kombu_1551_reader
    count = 60
    with connect(fs_transport.Transport, options) as conn:
        queue = conn.SimpleQueue("stress")
        for i in range(count):
            queue.put({"i": i, "body": LARGE_BODY})
        deadline = time.monotonic() + 10
        while len(reader.complete) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        reader.stop.set()
        reader.join(timeout=10)
        received = []
        for _ in range(count):
            message = queue.get(timeout=5)
            received.append(message.payload["i"])
            message.ack()
        queue.close()

    assert reader.partial == []
    # the reader really looked at every message, so the check above means something
    assert len(reader.complete) == count
    assert sorted(received) == list(range(count))


def test_stock_transport_shows_partial_messages(kombu_1551_reader):
    """Proves the reader can catch kombu issue #1551 when it is there.

    The race is a matter of timing, so keep publishing until the reader
    catches a partial file or a deadline passes; skip if it never does.
    """
    options, reader = kombu_1551_reader
    deadline = time.monotonic() + 10
    with connect(stock_filesystem.Transport, options) as conn:
        queue = conn.SimpleQueue("stock")
        while not reader.partial and time.monotonic() < deadline:
            queue.put({"body": LARGE_BODY})
            queue.clear()
        queue.close()

    if not reader.partial:
        pytest.skip("the race did not show within 10 s on this machine")
    name, size = reader.partial[0]
    assert name.endswith(".stock.msg")


def test_queued_task_ids_reads_the_waiting_tasks_without_consuming_them(tmp_path):
    from celery import Celery

    options = filesystem_broker_options(tmp_path / "broker")
    app = Celery("queued-ids", set_as_current=False)
    app.conf.update(broker_url="filesystem://", broker_transport=fs_transport.TRANSPORT_PATH,
                    broker_transport_options=options)
    try:
        app.send_task("proj.a", task_id="first")
        app.send_task("proj.b", task_id="second", queue="other")
    finally:
        app.close()
    folder = options["data_folder_in"]
    (tmp_path / "broker" / "data" / "torn.celery.msg").write_text('{"headers": {"id"')
    (tmp_path / "broker" / "data" / "notes.txt").write_text("{}")
    assert fs_transport.queued_task_ids(folder) == {"first", "second"}
    assert fs_transport.queued_task_ids(folder) == {"first", "second"}  # nothing was consumed
    assert fs_transport.queued_task_ids(tmp_path / "missing") == set()
