"""``celery_supervise.journal``: the task journal's public name, as apps install it.

``celery_supervise.journal.install(app)`` is how a Celery app turns the
journal on; the code lives on the Celery side, in
:mod:`celery_supervise.celery_side.journal`.
"""

from .celery_side.journal import *  # noqa: F401,F403
from .celery_side.journal import __all__  # noqa: F401
