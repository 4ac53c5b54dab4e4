"""Settings for the celery-supervise demo project.

Only what the demo needs: no web front end, a sqlite database under
``django_app/var/`` and a Celery worker configured through ``CELERY_*``.
"""

import os
from pathlib import Path

from celery_supervise.fs_transport import TRANSPORT_PATH, filesystem_broker_options

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-a-secret")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "celery_supervise",
    "demo",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / "db.sqlite3",
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# celery-supervise: where to find the worker's Celery app.
CELERY_SUPERVISE_APP = "demo.celery:app"
# ... and where its workers journal which tasks started and finished, so
# that `celery-supervise requeue` re-sends only the ones a stop cut off
# (demo/celery.py installs the journal; requeue reads this same setting).
CELERY_SUPERVISE_JOURNAL = os.environ.get("CELERY_SUPERVISE_JOURNAL_DIR", str(VAR_DIR / "journal"))

# Broker.  The same project runs on Redis or RabbitMQ when CELERY_BROKER_URL
# is set (redis://127.0.0.1:6379/0, amqp://guest:guest@127.0.0.1:5672//);
# Celery reads that variable itself, before any setting.  Without it, the
# broker is a folder, through celery-supervise's filesystem transport, which
# publishes messages atomically (kombu's own can lose them: kombu #1551).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL")
if not CELERY_BROKER_URL:
    CELERY_BROKER_URL = "filesystem://"
    # Only with a filesystem:// URL: the transport wins over the URL scheme.
    CELERY_BROKER_TRANSPORT = TRANSPORT_PATH
    CELERY_BROKER_TRANSPORT_OPTIONS = filesystem_broker_options(
        os.environ.get("CELERY_SUPERVISE_BROKER_DIR", VAR_DIR / "broker")
    )
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# No result backend: the demo's tasks report through files.
CELERY_TASK_IGNORE_RESULT = True
# One task per pool process at a time, acknowledged when it starts: a task
# that was running when the worker got killed is not delivered again
# (`celery-supervise requeue` sends it again; demo.tasks.mark_late is the
# acks_late kind, which the broker delivers again by itself).
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = False
