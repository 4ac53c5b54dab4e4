"""``manage.py celery savepid|kill`` against a real worker under a real supervisord.

The same deploy flow as test_e2e_kill.py, through the Django management
command: once in pytest's own process with ``call_command`` (Django set up
with ``demo.settings``, as in test_demo_tasks.py), once as a real
``python manage.py celery ...`` subprocess.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from realsupervisor import DJANGO_APP, copy_project
from taskfamily import (
    DETACHED, alive, json_output, kill_statuses, outcomes, recorded_verdicts, shutdown,
    start_families, worker_tree,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def django_settings(tmp_path, monkeypatch):
    """Django set up in-process with ``demo.settings``; returns ``django.conf.settings``.

    Settings are read once per process: if an earlier test set Django up,
    its broker folder stays, so tests read the folder from the settings
    rather than choose it.
    """
    monkeypatch.setenv("CELERY_SUPERVISE_BROKER_DIR", str(tmp_path / "broker"))
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "demo.settings")
    monkeypatch.syspath_prepend(str(DJANGO_APP))
    import django

    django.setup()
    from django.conf import settings

    return settings


def manage(project, *args, env, timeout=60):
    """Run ``python manage.py celery *args`` in `project`."""
    return subprocess.run(
        [sys.executable, "manage.py", "celery", *args],
        cwd=project, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def test_call_command_savepid_and_kill(supervisor, real_procs, django_settings, tmp_path, monkeypatch):
    from django.core.management import call_command

    # In-process, the app is the demo package pytest imported from
    # django_app/, so the worker runs from there too, on the same broker.
    broker_dir = Path(django_settings.CELERY_BROKER_TRANSPORT_OPTIONS["control_folder"]).parent
    run = supervisor(stopwaitsecs=2, broker_dir=broker_dir)
    run.wait_ready()
    # What supervisord sets for the programs it runs, and the command's
    # default --supervisor-url: only this supervisord's workers count, not
    # those other tests or benchmarks may run from django_app/ meanwhile.
    monkeypatch.setenv("SUPERVISOR_SERVER_URL", f"unix://{run.socket}")
    tree = worker_tree(run, real_procs)
    families = start_families(run.celery, real_procs, count=2)
    state = tmp_path / "state.json"

    out = io.StringIO()
    call_command("celery", "savepid", str(state), stdout=out, stderr=io.StringIO())
    assert out.getvalue().startswith(f"recorded 1 worker(s), 15 process(es), 2 active task(s) in {state}")
    record = json.loads(state.read_text())
    assert record["source"] == "supervisor+control"
    [worker] = record["workers"]
    assert worker["main"] == tree.main.pid
    assert worker["program"] == "celery-worker:celery-worker_0"
    assert {t["id"]: t["worker_pid"] for t in worker["tasks"]} == {f.task_id: f.pool_pid for f in families}
    expected = tree.verdicts()
    for family in families:
        expected.update(family.verdicts())
    assert recorded_verdicts(record) == expected

    # Keyword options, as the CLI's long names: the same live tree, nothing written.
    out = io.StringIO()
    call_command("celery", "status", json=True, reply_timeout=5, stdout=out, stderr=io.StringIO())
    live = json.loads(out.getvalue())
    assert [w["main"] for w in live["workers"]] == [tree.main.pid]
    assert recorded_verdicts(live) == expected

    shutdown(run)
    out = io.StringIO()
    call_command("celery", "kill", str(state), "--json", "--grace", "5", stdout=out, stderr=io.StringIO())
    report = json.loads(out.getvalue())
    assert report["exit_code"] == 0
    assert {pid: p["status"] for pid, p in outcomes(report).items()} == kill_statuses(tree, families)
    family_procs = [p for f in families for p in f.procs.values()]
    assert {p.pid for p in family_procs if alive(p)} == {pid for f in families for pid in f.pids(*DETACHED)}
    assert real_procs.reap() == []


def test_manage_py_savepid_and_kill(supervisor, real_procs, tmp_path):
    project = copy_project(tmp_path / "project")
    run = supervisor(stopwaitsecs=2, project_dir=project)
    run.wait_ready()
    tree = worker_tree(run, real_procs)
    [family] = start_families(run.celery, real_procs, count=1)
    state = tmp_path / "state.json"

    record = json_output(manage(project, "savepid", str(state), "--json", env=run.env))
    assert record["source"] == "control"
    [worker] = record["workers"]
    assert worker["main"] == tree.main.pid
    assert [(t["id"], t["worker_pid"]) for t in worker["tasks"]] == [(family.task_id, family.pool_pid)]
    assert recorded_verdicts(record) == {**tree.verdicts(), **family.verdicts()}

    shutdown(run)
    report = json_output(manage(project, "kill", str(state), "--json", "--grace", "5", env=run.env))
    assert {pid: p["status"] for pid, p in outcomes(report).items()} == kill_statuses(tree, [family])
    assert {p.pid for p in family.procs.values() if alive(p)} == family.pids(*DETACHED)
    assert real_procs.reap() == []
