"""The Django app: ``INSTALLED_APPS = [..., "celery_supervise"]``.

Django lists a management command under the last part of its app's module
path, so the app is the package itself: ``manage.py help`` shows
``celery`` under ``[celery_supervise]``. Importing this package does not
import Django; only this module and ``management/`` do, when Django loads
the app.
"""

from django.apps import AppConfig


class CelerySuperviseConfig(AppConfig):
    """Provides ``manage.py celery`` (see :mod:`celery_supervise.contrib.django.command`)."""

    name = "celery_supervise"
    label = "celery_supervise"
    verbose_name = "Celery supervise"
