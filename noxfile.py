"""The version matrix: the fast tests against the lowest and the newest allowed versions.

    nox                         # every session on every Python this machine has
    nox -s lowest-3.11 newest-3.11      # what .ci/run runs
    nox -l                      # list the sessions

Sessions:

* ``newest-3.X``: the newest release of every dependency (celery, Django,
  supervisor 4.3, typer, click, rich, kombu, redis), on Python 3.10 to 3.13;
* ``lowest-3.X``: every lower bound of pyproject.toml pinned exactly
  (``constraints-lowest.txt``: celery 5.3.0 with kombu 5.3.0 and redis 4.5.2,
  Django 4.2, supervisor 4.2.0, typer 0.18.0 with the newest click, rich 13.0.0,
  psutil 5.9.0), on the Pythons that set supports (see ``LOWEST_PYTHONS``);
* ``mixed-3.12(...)``: one end of a range with the newest of everything else:
  Django 4.2 LTS, supervisor 4.2, typer 0.18.

A Python that is not installed is skipped, and nox says so ("Skipping ...:
Python interpreter 3.X not found"); pass ``--error-on-missing-interpreters``
to fail instead, as .ci/run does.
"""

from __future__ import annotations

import glob
import os

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: The lowest set runs where all of it installs and works. Left out:
#: 3.12: psutil 5.9.0 (no wheel for 3.12) fails to build, its C code uses
#:       APIs Python 3.12 removed; celery 5.3.0 predates 3.12 support (5.3.5).
#: 3.13: the same, and Django 4.2 does not support 3.13.
LOWEST_PYTHONS = ["3.10", "3.11"]
LOWEST = "constraints-lowest.txt"
FAST = ("-m", "not e2e", "-q", "-p", "no:cacheprovider")

# pyenv's interpreters, where they are installed but not on PATH (a shim
# answers only for the selected version): put each version's bin first.
for bindir in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin")), reverse=True):
    os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]

nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = False


def fast_tests(session: nox.Session) -> None:
    session.run("python", "-c", "import celery, django, kombu, typer, rich, psutil, supervisor, importlib.metadata as m;"
                "print(', '.join(f'{d} {m.version(d)}' for d in ('celery', 'kombu', 'redis', 'django', 'supervisor',"
                " 'typer', 'click', 'rich', 'psutil', 'pytest')))")
    session.run("pytest", *FAST, *session.posargs, env={"PYTHONDONTWRITEBYTECODE": "1"})


@nox.session(python=PYTHONS)
def newest(session: nox.Session) -> None:
    """The newest release of every dependency."""
    session.install("--upgrade", ".[test]")
    fast_tests(session)


@nox.session(python=LOWEST_PYTHONS)
def lowest(session: nox.Session) -> None:
    """Every lower bound, pinned exactly (constraints-lowest.txt); what they do not pin is the newest."""
    session.install("-c", LOWEST, ".[test]", "setuptools")
    fast_tests(session)


@nox.session(python="3.12")
@nox.parametrize("pin", ["django==4.2.*", "supervisor==4.2.*", "typer==0.18.0"],
                 ids=["django-4.2", "supervisor-4.2", "typer-0.18"])
def mixed(session: nox.Session, pin: str) -> None:
    """One end of one range with the newest of everything else."""
    extra = ["setuptools<82"] if pin.startswith("supervisor") else []
    session.install(".[test]", pin, *extra)
    fast_tests(session)
