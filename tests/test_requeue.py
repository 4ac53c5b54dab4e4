"""The requeue decision, on plain data: recorded tasks + journal + ledger + broker facts -> verdicts.

No broker, no worker: :func:`celery_supervise.requeue.decide` is pure. The
e2e tests (test_e2e_requeue.py) run the whole command against real
workers on three brokers.
"""

import datetime
import decimal
import uuid

import pytest

from celery_supervise.processes import statefile
from celery_supervise.celery_side import task_json
from celery_supervise.celery_side.journal import FINISHED, INTERRUPTED, STARTED, Entry
from celery_supervise.celery_side.requeue import (
    ALREADY_REQUEUED, BACK_IN_QUEUE, DUPLICATE, INTERRUPTED as R_INTERRUPTED, LOST_UNACKED, NO_JOURNAL,
    NOT_IN_JOURNAL, REDELIVERED, RESEND, SKIP, TERMINATED, Recorded, Route, arguments, at_least_once, decide,
    route_of, unsendable,
)
from celery_supervise.processes.snapshot import Task

CELERY = {"exchange": "", "routing_key": "celery", "priority": 0, "redelivered": False}


def task(id="t1", acknowledged=True, delivery_info=CELERY, **kw):
    return Task(id=id, name=kw.pop("name", "proj.work"), args=kw.pop("args", [1]), kwargs=kw.pop("kwargs", {"x": 2}),
                delivery_info=delivery_info, acknowledged=acknowledged, **kw)


def started(id="t1", t=10.0):
    return Entry(id, STARTED, t)


def finished(id="t1", state="SUCCESS", t=11.0):
    return Entry(id, FINISHED, t, state)


def interrupted(id="t1", t=11.0):
    return Entry(id, INTERRUPTED, t)


# (name, task, journal or None, ledger, broker_keeps_unacked, queued, expected action, expected reason)
CASES = [
    ("in the ledger", task(), {"t1": started()}, {"t1"}, True, None, SKIP, ALREADY_REQUEUED),
    ("ledger wins over everything", task(acknowledged=False), None, {"t1"}, False, set(), SKIP, ALREADY_REQUEUED),
    ("journal: finished", task(), {"t1": finished()}, set(), True, None, SKIP, "finished (journal: SUCCESS)"),
    ("journal: finished failing", task(), {"t1": finished(state="FAILURE")}, set(), True, None,
     SKIP, "finished (journal: FAILURE)"),
    ("journal: retried (a new message carries it on)", task(), {"t1": finished(state="RETRY")}, set(), True, None,
     SKIP, "finished (journal: RETRY)"),
    ("journal: started, never finished", task(), {"t1": started()}, set(), True, None, RESEND, R_INTERRUPTED),
    ("journal: terminated midway", task(), {"t1": interrupted()}, set(), True, None, RESEND, TERMINATED),
    ("journal without this task", task(), {"other": finished("other")}, set(), True, None, RESEND, NOT_IN_JOURNAL),
    ("no journal", task(), None, set(), True, None, RESEND, NO_JOURNAL),
    ("acks_late, broker keeps it", task(acknowledged=False), {"t1": started()}, set(), True, None, SKIP, REDELIVERED),
    ("acks_late, no journal", task(acknowledged=False), None, set(), True, None, SKIP, REDELIVERED),
    ("acks_late that finished", task(acknowledged=False), {"t1": finished()}, set(), True, None,
     SKIP, "finished (journal: SUCCESS)"),
    ("acks_late, filesystem, back in the folder", task(acknowledged=False), None, set(), False, {"t1"},
     SKIP, BACK_IN_QUEUE),
    ("acks_late, filesystem, lost with a SIGKILLed worker", task(acknowledged=False), {"t1": started()}, set(),
     False, {"other"}, RESEND, LOST_UNACKED),
    ("acks_late, unknown whether queued", task(acknowledged=False), None, set(), False, None, SKIP, BACK_IN_QUEUE),
    ("acknowledged unknown (an old record)", task(acknowledged=None), None, set(), True, None, RESEND, NO_JOURNAL),
    ("no name", task(name="?"), None, set(), True, None, SKIP, "cannot be re-sent: no task name recorded"),
    ("no id", task(id="None"), None, set(), True, None, SKIP, "cannot be re-sent: no task id recorded"),
    ("args only as repr", task(args="(1,)"), None, set(), True, None,
     SKIP, "cannot be re-sent: its arguments were not recorded as data"),
    ("no route", task(delivery_info={}), None, set(), True, None,
     SKIP, "cannot be re-sent: no exchange, routing key or queue recorded"),
]


@pytest.mark.parametrize("t, journal, ledger, keeps, queued, action, reason", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_decide(t, journal, ledger, keeps, queued, action, reason):
    [d] = decide([Recorded(t, "w@h", 100)], journal=journal, ledger=frozenset(ledger),
                 broker_keeps_unacked=keeps, queued=None if queued is None else frozenset(queued))
    assert (d.action, d.reason) == (action, reason)
    assert (d.route is not None) == (action == RESEND)


def test_decide_keeps_the_record_order_and_decides_a_duplicate_once():
    recorded = [Recorded(task("a")), Recorded(task("b")), Recorded(task("a"))]
    decisions = decide(recorded, journal={"a": started("a"), "b": finished("b")})
    assert [(d.task.id, d.action, d.reason) for d in decisions] == [
        ("a", RESEND, R_INTERRUPTED), ("b", SKIP, "finished (journal: SUCCESS)"), ("a", SKIP, DUPLICATE)]


def test_at_least_once_names_only_the_resends_without_proof():
    decisions = decide([Recorded(task("a")), Recorded(task("b")), Recorded(task("c"))],
                       journal={"a": started("a"), "c": finished("c")})
    assert [d.task.id for d in at_least_once(decisions)] == ["b"]


@pytest.mark.parametrize(
    "delivery_info, route, shown",
    [
        (CELERY, Route(None, "celery", "celery", 0), "celery"),
        ({"exchange": "", "routing_key": "video"}, Route(None, "video", "video"), "video"),
        ({"exchange": "tasks", "routing_key": "video.encode", "priority": 5},
         Route("tasks", "video.encode", None, 5), "tasks / video.encode"),
        ({"exchange": "tasks", "routing_key": "x", "queue": "video"}, Route("tasks", "x", "video"), "video"),
        ({"exchange": None, "routing_key": None}, Route(None, None, None), "(default) / -"),
        ("not a dict", Route(None, None, None), "(default) / -"),
    ],
    ids=["default queue", "a queue through the default exchange", "topic exchange", "queue recorded", "nothing",
         "garbage"],
)
def test_route_of(delivery_info, route, shown):
    assert route_of(task(delivery_info=delivery_info)) == route
    assert route.describe() == shown


def test_arguments_come_back_with_their_types_through_the_state_file():
    """A datetime, UUID, Decimal or bytes argument survives savepid's JSON and is sent as itself."""
    values = [datetime.datetime(2030, 1, 2, 3, 4, 5), uuid.UUID(int=7), decimal.Decimal("1.10"), b"raw"]
    reply = {"id": "t1", "name": "proj.work", "args": values, "kwargs": {"when": values[0]},
             "delivery_info": CELERY, "acknowledged": True}
    stored = statefile.json.loads(statefile.json.dumps(reply, cls=task_json.Encoder))
    assert arguments(Task.from_reply(stored)) == (values, {"when": values[0]})


def test_an_argument_only_its_repr_was_kept_of_is_not_sent():
    class Opaque:
        pass

    stored = statefile.json.loads(statefile.json.dumps({"args": [Opaque()]}, cls=task_json.Encoder))
    t = task(args=stored["args"])
    assert unsendable(t) == "cannot be re-sent: its arguments were not recorded as data (only their repr)"
    with pytest.raises(ValueError):
        arguments(t)
