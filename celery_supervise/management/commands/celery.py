"""``manage.py celery``: where Django looks for it; the command is in contrib/django."""

from celery_supervise.contrib.django.command import Command

__all__ = ["Command"]
