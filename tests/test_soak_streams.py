"""``bench/soak.py --chaos --streams K``: the split of the cycles and the merge of the streams' documents (pure)."""

import sys

from realsupervisor import REPO

sys.path.insert(0, str(REPO))

from bench import soak, streams  # noqa: E402

COUNTS = dict.fromkeys(soak.COUNTS, 0)


def doc(cycles, timings, **over):
    d = {"cycles": cycles, "broker": "redis", "seed": 0, "counts": dict(COUNTS), "exit_code": 0, "error": None,
         "sent": 6 * cycles, "requeued": 1, "ran_twice": 0, "delayed": 2, "final_leftovers": None,
         "listener_problems": [], "chaos": True, "notes": {"2": ["a note"]}, "details": [], "timings": timings}
    d.update(over)
    return d


def test_split_is_even_and_never_empty():
    assert streams.split(1000, 3) == [334, 333, 333]
    assert streams.split(6, 2) == [3, 3]
    assert streams.split(2, 4) == [1, 1]


def test_merge_sums_counts_and_takes_medians_over_every_cycle():
    a = doc(2, [["clock-stepped", 1.0, 10.0], ["state-folder-full", 2.0, 20.0]])
    b = doc(3, [["clock-stepped", 3.0, 30.0], ["clock-stepped", 5.0, 50.0], ["state-folder-full", 4.0, 40.0]],
            counts=dict(COUNTS, tasks_lost=1), exit_code=1,
            details=[{"number": 3, "mode": "clock-stepped", **{k: [] for k in soak.COUNTS}, "tasks_lost": ["mark x"]}])
    merged = streams.merge([(21, 2, 0, a), (22, 3, 1, b)])
    assert merged["cycles"] == 5 and merged["sent"] == 30 and merged["delayed"] == 4
    assert merged["counts"]["tasks_lost"] == 1 and merged["exit_code"] == 1 and merged["error"] is None
    assert merged["times"]["clock-stepped"]["cycle"] == {"n": 3, "median": 30.0, "min": 10.0, "max": 50.0}
    assert merged["times"]["state-folder-full"]["restart"]["median"] == 3.0
    assert merged["notes"] == {"21:2": ["a note"], "22:2": ["a note"]}
    assert [s["seed"] for s in merged["streams"]] == [21, 22]
    text = soak.summary(merged)
    assert "5 cycle(s) on redis, 2 streams (seed 21: 2 cycle(s), seed 22: 3 cycle(s))" in text
    assert "| tasks lost | 1 |" in text
    assert "| clock-stepped | 3 | 3.00 s (1.00–5.00) | 30.00 s (10.00–50.00) |" in text
    assert "seed 22 cycle 3 (clock-stepped): tasks_lost: ['mark x']" in text


def test_a_stream_that_could_not_carry_out_a_cycle_or_died_makes_exit_2():
    ok = doc(1, [["clock-stepped", 1.0, 10.0]])
    assert streams.merge([(1, 1, 0, ok), (2, 1, 2, doc(0, [], error="cycle 1: CycleFailed: x"))])["exit_code"] == 2
    died = streams.merge([(1, 1, 0, ok), (2, 1, -9, streams._failed("the stream exited -9 without a result"))])
    assert died["exit_code"] == 2 and "seed 2" in died["error"]
