"""The demo project's tasks, run eagerly in pytest (the e2e tests run them in a worker)."""

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from realprocs import is_gone, sighup_ignored

DJANGO_APP = Path(__file__).resolve().parent.parent / "django_app"


@pytest.fixture
def demo_tasks(tmp_path, monkeypatch):
    """``demo.tasks``, with Django set up and the broker folder in tmp_path."""
    monkeypatch.setenv("CELERY_SUPERVISE_BROKER_DIR", str(tmp_path / "broker"))
    monkeypatch.setenv("CELERY_SUPERVISE_JOURNAL_DIR", str(tmp_path / "journal"))
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "demo.settings")
    monkeypatch.syspath_prepend(str(DJANGO_APP))
    import django

    django.setup()
    from demo import tasks

    return tasks


def test_add(demo_tasks):
    assert demo_tasks.add.apply(args=(2, 3)).get() == 5


def test_spawn_family_leaves_its_children_running(demo_tasks, real_procs, tmp_path):
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()

    result = demo_tasks.spawn_family.apply(
        kwargs={"marker_dir": str(marker_dir), "hold": 0, "lifetime": 30}, task_id="t1"
    ).get()
    family = dict(zip(result["children"], real_procs.track(*result["children"].values())))

    assert json.loads((marker_dir / "t1.json").read_text()) == result
    assert result["pool_pid"] == os.getpid()
    assert family.keys() == result["children"].keys()
    assert not any(is_gone(proc) for proc in family.values())
    for role in ("plain", "plain_grandparent", "nohup", "setsid"):
        assert family[role].ppid() == os.getpid(), role
    assert family["plain_grandchild"].ppid() == family["plain_grandparent"].pid
    assert family["setsid_grandchild"].ppid() == family["setsid"].pid
    for role in ("plain", "plain_grandparent", "plain_grandchild", "nohup"):
        assert os.getpgid(family[role].pid) == os.getpgrp(), role
    for role in ("setsid", "setsid_grandchild"):
        assert os.getsid(family[role].pid) == family["setsid"].pid, role
    assert sighup_ignored(family["nohup"].pid)
    assert family["nohup"].cmdline() == ["sleep", "30"]
    for role in ("plain", "plain_grandparent", "plain_grandchild", "setsid", "setsid_grandchild"):
        assert not sighup_ignored(family[role].pid), role
    assert not (marker_dir / "nohup.out").exists()
    assert sorted(p.name for p in marker_dir.iterdir()) == [
        "t1.done", "t1.json", "t1.plain_grandchild", "t1.setsid_grandchild",
    ]


def test_mark_writes_when_and_where_it_started_and_finished(demo_tasks, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    before = time.time()
    assert demo_tasks.mark.apply(kwargs={"marker_dir": str(markers), "hold": 0.1}, task_id="m1").get() == "m1"
    started = json.loads((markers / "m1.started").read_text())
    done = json.loads((markers / "m1.done").read_text())
    assert before <= started["time"] <= done["time"] - 0.1 <= time.time()
    assert (done["worker"], done["pool"]) == (os.getppid(), os.getpid())
    assert sorted(p.name for p in markers.iterdir()) == ["m1.done", "m1.runs", "m1.started"]
    assert [json.loads(line) for line in (markers / "m1.runs").read_text().splitlines()] == [started]


def test_mark_counts_its_runs_and_holds_only_while_its_gate_exists(demo_tasks, tmp_path):
    markers, gate = tmp_path / "markers", tmp_path / "gate"
    markers.mkdir()
    kwargs = {"marker_dir": str(markers), "hold": 30, "gate": str(gate)}
    start = time.monotonic()
    demo_tasks.mark.apply(kwargs=kwargs, task_id="m2")  # no gate: no wait
    demo_tasks.mark_late.apply(kwargs=kwargs, task_id="m2")  # the same id again: a second run
    assert time.monotonic() - start < 5
    assert len((markers / "m2.runs").read_text().splitlines()) == 2
    assert demo_tasks.mark_late.acks_late and not demo_tasks.mark.acks_late


def test_the_demo_app_journals_its_tasks(demo_tasks):
    from celery_supervise.celery_side import journal
    from demo.celery import app

    demo_tasks.add.apply(args=(1, 2), task_id="j1")
    # CELERY_SUPERVISE_JOURNAL_DIR as the first test here set it: Django reads its settings once.
    directory = journal.configured_directory(app)
    assert directory and directory.startswith(tempfile.gettempdir())
    assert journal.read(directory, ["j1"])["j1"].state == "SUCCESS"
