"""Task arguments as JSON: kombu's encoding, so a recorded task can be sent again unchanged.

The process layer writes state files with plain JSON; savepid hands it this
encoder for the task arguments the broker's ``active`` reply carried.
"""

from __future__ import annotations

import json

#: How a value no JSON type fits is marked in a document (see :class:`Encoder`).
UNREADABLE = "celery-supervise/repr"


class Encoder(json.JSONEncoder):
    """JSON as kombu writes it, so task arguments keep their types.

    Celery's JSON serializer sends a ``datetime``, ``UUID``, ``Decimal`` or
    ``bytes`` argument as ``{"__type__": ..., "__value__": ...}``, and the
    ``active`` reply decodes it back; writing it the same way lets
    ``requeue`` send the very same value again (``kombu.utils.json.loads``).
    Anything else is stored as its repr, under a marker kombu does not
    know, so that decoding it fails instead of sending a string in its
    place.
    """

    def default(self, o):
        # kombu's encoder, imported for the first value plain JSON cannot
        # write: most records (PIDs, command lines) never need it.
        from kombu.utils.json import JSONEncoder as KombuEncoder

        try:
            return KombuEncoder().default(o)
        except TypeError:
            return {"__type__": UNREADABLE, "__value__": repr(o)}
