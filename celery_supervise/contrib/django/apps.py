from django.apps import AppConfig


class CelerySuperviseConfig(AppConfig):
    """Django app that provides the ``celery_supervise`` management command."""

    name = "celery_supervise.contrib.django"
    label = "celery_supervise"
    verbose_name = "Celery supervise"
