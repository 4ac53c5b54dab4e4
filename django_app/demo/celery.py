"""The demo's Celery app: ``celery -A demo worker``.

All configuration comes from Django settings with the ``CELERY_`` prefix;
see ``demo/settings.py`` for how the broker is chosen.
"""

import os

from celery import Celery

import celery_supervise.journal

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

app = Celery("demo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Journal every task's start and finish, in the CELERY_SUPERVISE_JOURNAL
# folder, for `celery-supervise requeue`.
celery_supervise.journal.install(app)
