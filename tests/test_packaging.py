"""The lowest set is every lower bound: constraints-lowest.txt pins exactly what the installed metadata allows at least.

noxfile.py's ``lowest`` session installs with these constraints; if a
bound in pyproject.toml moved without them, that session would test
something else than the bound. Read from the installed distribution, so it
holds for the wheel or sdist under test, not only for this checkout.
"""

import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints-lowest.txt"


def applies(req, extra=""):
    """Whether *req* applies to this Python (and to *extra*)."""
    return req.marker is None or req.marker.evaluate({"extra": extra})


def pins():
    """``{name: ==spec}`` of the constraints that apply to this Python."""
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if applies(req):
                [spec] = req.specifier
                found[req.name.lower()] = spec
    return found


def test_every_lower_bound_is_pinned_exactly_in_the_lowest_set():
    pinned = pins()
    for text in importlib.metadata.requires("celery-supervise"):
        req = Requirement(text)
        if not any(applies(req, extra) for extra in ("", "django", "redis", "test")):
            continue  # another Python's bound, or the docs builder (.ci/run builds the pages with it)
        for spec in req.specifier:
            assert spec.operator == ">=", f"{text}: only lower bounds, no caps ({spec})"
            pin = pinned.get(req.name.lower())
            assert pin is not None and pin.operator == "==", f"{req.name} has no exact pin in {CONSTRAINTS.name}"
            assert Version(pin.version) == Version(spec.version), f"{req.name}: bound {spec}, pinned {pin}"
