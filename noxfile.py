"""The version matrix: the fast tests against the lowest and the newest allowed versions.

    nox                         # every session on every Python this machine has
    nox -s package lowest-3.11 newest-3.11      # what .ci/run runs
    nox -l                      # list the sessions

Every test session installs the package from a freshly built sdist and
runs the fast tests from the unpacked sdist, outside this checkout: each one
also proves that the sdist carries what its tests need. Sessions:

* ``package``: builds the sdist and the wheel, ``twine check``, and looks
  into the wheel (``py.typed``, the license);

* ``newest-3.X``: the newest release of every dependency (celery, Django,
  supervisor 4.3, typer, click, rich, kombu, redis), on Python 3.10 to 3.13;
* ``lowest-3.X``: every lower bound of pyproject.toml pinned exactly
  (``constraints-lowest.txt``: celery 5.3.0 with kombu 5.3.0 and redis 4.5.2,
  Django 4.2, supervisor 4.2.0 (4.2.5 on 3.12 and later), typer 0.18.0 with
  the newest click, rich 13.0.0, psutil 5.9.0), on Python 3.10 to 3.13;
* ``mixed-3.12(...)``: one end of a range with the newest of everything else:
  Django 4.2 LTS, supervisor 4.2, typer 0.18.

A Python that is not installed is skipped, and nox says so ("Skipping ...:
Python interpreter 3.X not found"); pass ``--error-on-missing-interpreters``
to fail instead, as .ci/run does.
"""

from __future__ import annotations

import glob
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: The lowest set runs on every Python: its lower bounds are per Python
#: where they must be (supervisor 4.2.5 from 3.12 on, see pyproject.toml).
LOWEST_PYTHONS = PYTHONS
LOWEST = "constraints-lowest.txt"
FAST = ("-m", "not e2e", "-q", "-p", "no:cacheprovider")

# pyenv's interpreters, where they are installed but not on PATH (a shim
# answers only for the selected version): put each version's bin first.
for bindir in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin")), reverse=True):
    os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]

nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = False


def build(session: nox.Session, *what: str) -> Path:
    """Build the sdist (and whatever else *what* asks for) into a fresh folder of the session's."""
    out = Path(session.create_tmp()) / "dist"
    shutil.rmtree(out, ignore_errors=True)
    session.install("build")
    session.run("python", "-m", "build", *what, "--outdir", str(out), ".", silent=True)
    return out


def sdist_tests(session: nox.Session, *requirements: str, constraints: str | None = None) -> None:
    """Install the package from its sdist (with *requirements*), then run the fast tests of the unpacked sdist."""
    [sdist] = build(session, "--sdist").glob("*.tar.gz")
    unpacked = Path(session.create_tmp()) / "sdist"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    [root] = unpacked.iterdir()
    pinned = ["-c", str(Path(constraints).resolve())] if constraints else []
    session.install(*pinned, f"{root}[test]", *requirements)
    session.run("python", "-c", "import importlib.metadata as m; print(', '.join(f'{d} {m.version(d)}' for d in ("
                "'celery', 'kombu', 'redis', 'django', 'supervisor', 'typer', 'click', 'rich', 'psutil', 'pytest')))")
    session.chdir(root)
    session.run("pytest", *FAST, *session.posargs, env={"PYTHONDONTWRITEBYTECODE": "1"})


@nox.session(python="3.11")
def package(session: nox.Session) -> None:
    """The sdist and the wheel build, twine finds nothing wrong, the wheel is typed and licensed."""
    dist = build(session, "--sdist", "--wheel")
    session.install("twine")
    session.run("twine", "check", "--strict", *map(str, dist.iterdir()))
    [wheel] = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    for needed in ("celery_supervise/py.typed", "celery_supervise/apps.py",
                   "celery_supervise/management/commands/celery.py"):
        if needed not in names:
            session.error(f"{wheel.name} lacks {needed}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        session.error(f"{wheel.name} lacks its LICENSE")


@nox.session(python=PYTHONS)
def newest(session: nox.Session) -> None:
    """The newest release of every dependency."""
    sdist_tests(session)


@nox.session(python=LOWEST_PYTHONS)
def lowest(session: nox.Session) -> None:
    """Every lower bound, pinned exactly (constraints-lowest.txt); what they do not pin is the newest."""
    sdist_tests(session, "setuptools", constraints=LOWEST)


@nox.session(python="3.12")
@nox.parametrize("pin", ["django==4.2.*", "supervisor==4.2.5", "typer==0.18.0"],
                 ids=["django-4.2", "supervisor-4.2", "typer-0.18"])
def mixed(session: nox.Session, pin: str) -> None:
    """One end of one range with the newest of everything else."""
    sdist_tests(session, pin, *(["setuptools<82"] if pin.startswith("supervisor") else []))
