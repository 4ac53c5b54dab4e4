"""``celery_supervise.fs_transport``: the guarded filesystem transport's public name.

Apps name it in their configuration (``broker_transport =
"celery_supervise.fs_transport:Transport"``, :data:`TRANSPORT_PATH`); the
code lives on the Celery side, in :mod:`celery_supervise.celery_side.fs_transport`.
"""

from .celery_side.fs_transport import *  # noqa: F401,F403
from .celery_side.fs_transport import TRANSPORT_PATH, __all__  # noqa: F401
