"""The demo's Celery app: ``celery -A demo worker``.

All configuration comes from Django settings with the ``CELERY_`` prefix;
see ``demo/settings.py`` for how the broker is chosen.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

app = Celery("demo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
