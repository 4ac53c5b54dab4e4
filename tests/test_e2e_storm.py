"""An event storm: ``supervisorctl restart all`` with 32 workers and the listener under one supervisord.

See ``tests/storm.py`` for the setup. With the ``buffer_size`` that
``print-config`` recommends for 32 workers, the listener reaps every old
tree (each worker's attached task children killed, the detached spared)
and supervisord discards no event on the way.
"""

import uuid

import pytest

from brokers import clean_redis, require
from celery_supervise.commands.print_config import buffer_size_for
from realprocs import is_gone, wait_gone
from realsupervisor import copy_project
from storm import Storm
from taskfamily import ATTACHED, DETACHED
from test_e2e_listener import Listening

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/5"
WORKERS = 32


def test_restart_all_of_32_workers_reaps_every_tree_and_discards_no_event(tmp_path, real_procs):
    require(REDIS_URL)
    uid = uuid.uuid4().hex[:8]
    project = copy_project(tmp_path / "project")
    (tmp_path / "sup").mkdir()
    storm = Storm(tmp_path / "sup", project, workers=WORKERS, buffer_size=buffer_size_for(WORKERS),
                  redis_url=REDIS_URL, uid=uid, env={"CELERY_SUPERVISE_LOCK": str(tmp_path / "reaper.lock")})
    try:
        storm.start()
        old = real_procs.track(*storm.mains().values())
        families = storm.families(real_procs.track)
        listening = Listening(storm.run, real_procs)
        storm.wait_recorded(families, listening.entries)
        sent_before = len(storm.events_sent())

        result = storm.run.ctl("restart", "all", timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr

        attached = [f[role] for f in families for role in ATTACHED]
        assert wait_gone(old, timeout=30) == []
        left = wait_gone(attached, timeout=60)
        assert left == [], f"{len(left)} attached leftover(s) of the old workers live\n{storm.run.diagnostics()}"
        dead = [(role, f[role].pid) for f in families for role in DETACHED if is_gone(f[role])]
        assert dead == [], f"detached processes were killed: {dead}"
        assert storm.discarded() == [], storm.discarded()[:5]
        storm.wait_settled(listening.entries, [p.pid for p in old])
        bad = [e for e in listening.entries() if e["action"] in ("malformed", "error", "refused")]
        assert bad == [], bad
        # At least each worker's four state changes reached the listener, none dropped.
        assert len(storm.events_sent(sent_before)) >= 4 * WORKERS
    finally:
        storm.run.stop()
        clean_redis(REDIS_URL, uid)
    assert real_procs.reap() == []
