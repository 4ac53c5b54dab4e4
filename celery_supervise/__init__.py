"""celery-supervise: make supervisord stop Celery workers properly."""

__version__ = "0.1.0"
