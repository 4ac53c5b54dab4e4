"""kombu's filesystem transport, with messages published atomically.

kombu's ``filesystem`` transport keeps one file per message in a folder.
Its ``Channel._put`` opens ``<data_folder_out>/<name>.msg`` and only then
writes the payload into it.  A consumer listing the same folder in that
window finds an empty or half-written file, moves it away and fails with
``JSONDecodeError: Expecting value: line 1 column 1 (char 0)``; the task is
lost (kombu issue #1551).  The ``flock`` kombu takes while writing does not
help, because the reader never takes one.

Here ``_put`` writes the message into a staging folder *beside* the data
folder, flushes and fsyncs it, then renames it into the data folder.  A
rename within one filesystem is atomic, so a reader only ever sees complete
files.  kombu's file naming is kept unchanged
(``<monotonic ms>_<uuid>.<queue>.msg``), so ordering and queue matching in
``_get``, ``_size`` and ``_purge`` still work.

Selecting it from a Celery app
------------------------------
Give the class through ``broker_transport`` and keep ``filesystem://`` as the
URL::

    app.conf.broker_url = "filesystem://"
    app.conf.broker_transport = "celery_supervise.fs_transport:Transport"
    app.conf.broker_transport_options = filesystem_broker_options(root)

or with Django settings and ``namespace="CELERY"``: ``CELERY_BROKER_URL``,
``CELERY_BROKER_TRANSPORT`` and ``CELERY_BROKER_TRANSPORT_OPTIONS``.
kombu uses the URL's scheme only when no transport is given explicitly.

An import path as the URL's scheme does *not* work with kombu 5.7 (checked
by experiment): ``celery_supervise.fs_transport:Transport://`` is not a URL
scheme at all (``_`` is not allowed in one), so kombu fails with
``KeyError: 'No such transport: '``; a dotted scheme such as
``kombu.transport.filesystem://`` is refused with ``ValueError: Invalid
transport scheme`` (kombu issue #2641: a URL alone must not choose which
module gets imported).

Beware that ``broker_transport`` wins over the URL's scheme: set it only
when the URL really is ``filesystem://``, or a ``redis://`` URL would be
handed to this transport.  Also, Celery reads the ``CELERY_BROKER_URL``
environment variable before any configured ``broker_url``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

__all__ = ["Channel", "Transport", "filesystem_broker_options", "queued_task_ids"]

#: What to put in ``broker_transport`` to select this transport.
TRANSPORT_PATH = "celery_supervise.fs_transport:Transport"

#: kombu polls the folder once a second by default: far too slow for a worker
#: that should pick up a task, or answer a ping, right away.
POLLING_INTERVAL = 0.05


class Channel(filesystem.Channel):
    """Filesystem channel whose messages appear in the data folder whole."""

    @cached_property
    def staging_folder(self):
        """Folder where messages are written before they are published.

        It must be on the same filesystem as ``data_folder_out`` for the
        rename to be atomic, so the default is a sibling of it:
        ``<data_folder_out>.staging``.
        """
        folder = self.transport_options.get("staging_folder")
        if folder is None:
            folder = os.path.normpath(self.data_folder_out) + ".staging"
        os.makedirs(folder, exist_ok=True)
        return folder

    def _put(self, queue, payload, **kwargs):
        """Put `payload` onto `queue`: write aside, fsync, rename into place."""
        # Same name as kombu's: its sort order is the delivery order, and
        # everything after the first "." names the queue.
        filename = "{}_{}.{}.msg".format(
            int(round(monotonic() * 1000)), uuid.uuid4(), queue
        )
        staged = os.path.join(self.staging_folder, filename)
        published = os.path.join(self.data_folder_out, filename)
        try:
            with open(staged, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
                f.flush()
                os.fsync(f.fileno())
            # The race kombu's own _put has: a consumer lists the data folder
            # at any moment and takes every *.msg file it finds.  Until this
            # rename the message is not in that folder at all; after it, the
            # file is there complete.  The rename is atomic because both
            # folders are on one filesystem.
            os.rename(staged, published)
        except OSError as exc:
            try:
                os.unlink(staged)
            except OSError:
                pass
            raise ChannelError(
                f"Cannot add file {published!r} to directory"
            ) from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport using :class:`Channel`."""

    Channel = Channel


def filesystem_broker_options(root):
    """Return ``broker_transport_options`` for a broker kept under `root`.

    Producers and consumers share one folder, ``root/data``; exchange
    bindings live in ``root/control``.  The folders are created, because
    kombu does not create them itself.
    """
    root = Path(root)
    data = root / "data"
    control = root / "control"
    for folder in (data, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(data),
        "data_folder_out": str(data),
        "control_folder": str(control),
        "polling_interval": POLLING_INTERVAL,
    }


def queued_task_ids(data_folder) -> set[str]:
    """The task ids of the messages waiting in the filesystem broker's *data_folder*.

    Read without consuming anything: each ``*.msg`` file is one message,
    its task id in the message's ``headers`` (task protocol 2). A worker
    that shuts down cleanly puts the messages it had not acknowledged back
    into this folder, and one killed with SIGKILL does not: ``requeue`` asks here which of the two happened. A file that
    vanishes (consumed meanwhile) or does not parse is skipped.
    """
    ids = set()
    try:
        names = os.listdir(data_folder)
    except FileNotFoundError:
        return ids
    for name in names:
        if not name.endswith(".msg"):
            continue
        try:
            with open(os.path.join(data_folder, name), "rb") as f:
                message = loads(f.read())
        except (OSError, ValueError):
            continue
        task_id = _task_id(message)
        if task_id:
            ids.add(task_id)
    return ids


def _task_id(message) -> str | None:
    # Task protocol 2 (Celery 4+) keeps the id in the message headers.
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None
