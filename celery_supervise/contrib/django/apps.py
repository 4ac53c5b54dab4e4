"""The old app entry, ``"celery_supervise.contrib.django"``: deprecated, still working.

It offers the same ``manage.py celery`` command, but Django lists it under
``[django]`` (the last part of this module path). Use ``"celery_supervise"``
in ``INSTALLED_APPS`` instead; ``manage.py check`` says so (W001).
"""

from django.apps import AppConfig
from django.core import checks

OLD_ENTRY = "celery_supervise.contrib.django"
NEW_ENTRY = "celery_supervise"


def deprecated_entry(app_configs, **kwargs):
    return [checks.Warning(
        f"{OLD_ENTRY!r} in INSTALLED_APPS is deprecated.",
        hint=f"Use {NEW_ENTRY!r} instead: the same `manage.py celery` command, listed under "
             "[celery_supervise] in `manage.py help`.",
        id="celery_supervise.W001",
    )]


class CelerySuperviseConfig(AppConfig):
    name = OLD_ENTRY
    label = "celery_supervise"
    verbose_name = "Celery supervise"

    def ready(self):
        checks.register(deprecated_entry, checks.Tags.compatibility)
