"""Chaos soak streams side by side: ``bench/soak.py --chaos --streams K``; one merged table.

One chaos stream runs a cycle every 15 to 25 s on a 2-core machine, so
1,000 cycles take hours. K streams run at once, each a ``bench/soak.py
--chaos --json`` process of its own (seeds S, S+1, ...; ``--cycles`` split
between them; each still deals its faults as a deck shuffled per round),
and their documents merge into one: counts summed, each mode's times from
every stream's cycles, each stream's seed and cycles listed.

Processes, not threads: a soak sets process-wide state (its environment
mark, the audit log's variable), and a stream that crashes must not take
the others with it. What keeps the streams apart:

* each runs its own redis-server (a free port), supervisord (socket in its
  own folder), run folder, queue and node names, audit log and reaper lock;
  a chaos soak never uses the plain soak's Redis db 14;
* each gets a leak-guard mark of its own (``CELERY_SUPERVISE_TEST_RUN``),
  set here, not inherited: a soak's sweeps kill, by PID, whatever carries
  its mark, so a shared mark would let one stream kill another's processes;
* the clock-stepped fault steps a clock they all share: each stream holds
  the clock lock (``bench/clocklock.py``) shared for each cycle, and the
  step is made holding it exclusive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

SOAK = Path(__file__).resolve().parent / "soak.py"
RUN_ENV_VAR = "CELERY_SUPERVISE_TEST_RUN"
#: How long an interrupted stream may take to clean up (stop its supervisord, reap its processes).
STREAM_CLEANUP = 120
COUNTS = ("attached_leaked", "detached_killed", "tasks_lost", "innocents_killed", "audit_missing")


def split(cycles: int, streams: int) -> list[int]:
    """*cycles* over at most *streams* streams, as even as can be (no stream of 0 cycles)."""
    streams = max(1, min(streams, cycles))
    return [cycles // streams + (1 if i < cycles % streams else 0) for i in range(streams)]


def stream_args(args) -> list[str]:
    """The options every stream gets (not --cycles, --seed, --json, --streams)."""
    out = ["--chaos", "--modes", args.modes, "--clock-lock", args.clock_lock]
    if args.faults:
        out += ["--faults", args.faults]
    if args.minutes is not None:
        out += ["--minutes", repr(args.minutes)]  # all start together: one budget for all
    if args.quick:
        out.append("--quick")
    if args.keep:
        out.append("--keep")
    return out


def run(common: list[str], cycles: int, streams: int, seed: int, log=print) -> dict:
    """Start the streams, forward their progress lines (prefixed), wait, merge their documents."""
    procs = []
    for i, n in enumerate(split(cycles, streams)):
        env = dict(os.environ)
        env[RUN_ENV_VAR] = f"soak-{uuid.uuid4().hex}-seed{seed + i}"  # never the parent's: see the docstring
        proc = subprocess.Popen([sys.executable, str(SOAK), *common, "--cycles", str(n), "--seed", str(seed + i),
                                 "--json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        forward = threading.Thread(target=_forward, args=(proc.stderr, f"[seed {seed + i}] ", log), daemon=True)
        forward.start()
        procs.append((seed + i, n, proc, forward))
    try:
        outs = [proc.stdout.read() for _, _, proc, _ in procs]
    except KeyboardInterrupt:
        # Ctrl-C reaches every stream (one process group); SIGTERM reached
        # this process alone: pass it on, and wait for each stream's cleanup.
        for *_, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        for *_, proc, _ in procs:
            try:
                proc.wait(STREAM_CLEANUP)
            except subprocess.TimeoutExpired:
                pass
        raise
    docs = []
    for (s, n, proc, forward), out in zip(procs, outs):
        proc.wait()
        forward.join(10)
        try:
            doc = json.loads(out)
        except ValueError:
            doc = _failed(f"the stream exited {proc.returncode} without a result: {out[-300:]!r}")
        docs.append((s, n, proc.returncode, doc))
    return merge(docs)


def _forward(stream, prefix, log):
    for line in stream:
        log(prefix + line.rstrip("\n"))


def _failed(error: str) -> dict:
    return {"cycles": 0, "counts": {k: 0 for k in COUNTS}, "error": error, "sent": 0, "requeued": 0,
            "ran_twice": 0, "delayed": 0, "final_leftovers": None, "listener_problems": [], "notes": {},
            "details": [], "timings": []}


def merge(docs: list[tuple[int, int, int, dict]]) -> dict:
    """``(seed, cycles asked, exit status, document)`` of each stream -> one document, as soak.py's."""
    from bench.soak import times_of

    counts = {k: sum(d["counts"].get(k, 0) for *_, d in docs) for k in COUNTS}
    errors = [f"seed {s}: {d['error']}" for s, _, _, d in docs if d.get("error")]
    # A stream that died without saying why (killed, crashed) is a cycle not carried out.
    errors += [f"seed {s}: exited {rc}" for s, _, rc, d in docs if rc not in (0, 1) and not d.get("error")]
    exit_code = 2 if errors else (1 if any(counts.values()) else 0)
    timings = [row for *_, d in docs for row in d.get("timings", [])]
    leftovers = [f"seed {s}: {d['final_leftovers']}" for s, _, _, d in docs if d.get("final_leftovers")]
    return {
        "cycles": sum(d["cycles"] for *_, d in docs), "broker": "redis", "seed": docs[0][0],
        "counts": counts, "exit_code": exit_code, "error": "; ".join(errors) or None,
        **{k: sum(d.get(k, 0) for *_, d in docs) for k in ("sent", "requeued", "ran_twice", "delayed")},
        "times": times_of(timings),
        "final_leftovers": "; ".join(leftovers) or None,
        "listener_problems": [dict(p, seed=s) for s, _, _, d in docs for p in d.get("listener_problems", [])],
        "chaos": True,
        "notes": {f"{s}:{n}": notes for s, _, _, d in docs for n, notes in d.get("notes", {}).items()},
        "details": [dict(x, seed=s) for s, _, _, d in docs for x in d.get("details", [])],
        "timings": timings,
        "streams": [{"seed": s, "cycles_asked": asked, "cycles": d["cycles"], "exit_code": rc, "error": d.get("error")}
                    for s, asked, rc, d in docs],
    }
