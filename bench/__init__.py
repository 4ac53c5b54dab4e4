"""Performance measurements of celery-supervise against what users would otherwise run.

Not tests: ``python bench/run.py`` prints one table of medians, ranges and
PASS/MISS against the targets; see ``bench/README.md``.
"""
