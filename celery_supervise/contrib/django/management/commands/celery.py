"""``manage.py celery`` under the deprecated app entry ``celery_supervise.contrib.django``."""

from celery_supervise.contrib.django.command import Command

__all__ = ["Command"]
