"""The chaos soak's faults: one is drawn per cycle (``bench/soak.py --chaos --seed S``).

Each fault is a function ``fault(soak, number, state) -> (requeued task
ids, innocents)``, like :meth:`soak.Soak.restart`: it makes one thing go
wrong during the restart of the worker, for real, at a handshake (a state
file appearing, a line in the audit log, supervisord's process state),
then does what an operator would do next (run the command again, start
what is down, requeue) until the worker runs again. The soak then counts,
as in every cycle, what leaked, what was killed wrongly, what was lost,
and which signal a witness received that the audit log does not hold.

:data:`FAULTS` is the table the draw is made from. The escape routes of
issue 13's first point are faults of their own (``escape-*``, at the
end): a real task's children leave the worker's tree and process group
(a double fork plus setpgid, ``Popen(process_group=0)``, ``set -m``, a
pool process replaced by an ``--autoscale`` shrink) before savepid, then
the worker is restarted one of the soak's usual ways; the soak tracks
the children by PID + creation time: the attached one must be dead after
the cycle, the setsid'd and nohup'd ones alive. Only the worker's cgroup
still finds them (the soak's listener places each worker in one before
its first task), so they are drawn only where cgroup v2 tracking works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from realprocs import WaitTimeout, is_gone, wait_for, wait_gone
from realsupervisor import PROGRAM

#: How long a handshake of a fault may take to come.
HANDSHAKE = 60.0
#: The tiny filesystem of the "state folder full" fault.
FULL_SIZE = "256k"

Fault = Callable[["object", int, Path], tuple[list[str], list]]
FAULTS: dict[str, Fault] = {}
#: Faults whose cycle runs a task child that SIGTERM does not end (so a kill is still under way at the handshake).
NEEDS_STUBBORN = set()
#: Faults that only the worker's cgroup can deal with (drawn only where cgroup v2 tracking works).
NEEDS_CGROUPS = set()


def register(name: str, stubborn: bool = False, cgroup: bool = False):
    def deco(fn: Fault) -> Fault:
        FAULTS[name] = fn
        if stubborn:
            NEEDS_STUBBORN.add(name)
        if cgroup:
            NEEDS_CGROUPS.add(name)
        return fn
    return deco


# ---------------------------------------------------------------- helpers


def audit_lines(soak) -> list[dict]:
    out = []
    try:
        with open(soak.audit_path, "rb") as f:
            for raw in f:
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    out.append({"torn": raw[:200]})
    except FileNotFoundError:
        pass
    return out


def wait_intent(soak, match: Callable[[dict], bool], what: str, timeout: float = HANDSHAKE) -> dict:
    """Wait for an intent line of the audit log that *match* accepts (the kill is under way)."""
    def found():
        return next((x for x in audit_lines(soak) if x.get("phase") == "intent" and match(x)), None)
    return wait_for(found, timeout, what, interval=0.02)


def broker_back(soak) -> None:
    """Start the private redis-server again; the soak's own client drops its dead connections."""
    soak.redis.start()
    soak.fresh_client()


def orphan_supervisord(soak) -> tuple[psutil.Process, psutil.Process | None]:
    """SIGKILL supervisord, as the kill-9 mode does; wait for its listener to leave at end of input."""
    sup = psutil.Process(soak.supervisord_pid())
    listener = soak.process_pid(soak.LISTENER)
    listener = psutil.Process(listener) if listener else None
    os.kill(sup.pid, signal.SIGKILL)
    soak._collect_old_supervisord()
    if wait_gone([p for p in (sup, listener) if p is not None], 15):
        raise soak.CycleFailed(f"supervisord {sup.pid} or its listener outlived SIGKILL + 15 s")
    return sup, listener


def start_again(soak, old_main: int, state: Path, saved: bool) -> list[str]:
    """A new supervisord: its listener's sweep deals with the old worker; then requeue what was recorded."""
    try:
        soak.run.start()
    except Exception as exc:  # SupervisordFailed, WaitTimeout
        raise soak.CycleFailed(str(exc)) from None
    soak.wait_reaped(old_main)
    soak.wait_worker()
    return soak.requeue(state) if saved else []


def savepid(soak, state: Path) -> bool:
    """``savepid STATE`` of an orphan; True when the record holds the tasks (exit 0)."""
    saved = soak.cli("savepid", str(state), "--json")
    if saved.returncode not in (0, 3):
        raise soak.CycleFailed(f"savepid exited {saved.returncode}:\n{saved.stderr}")
    return saved.returncode == 0


def restart_cli(soak, state: Path, **popen):
    args = [str(soak.BIN / "celery-supervise"), "-A", "demo", "restart", PROGRAM, "-c", str(soak.run.conf_path),
            "--grace", str(soak.KILL_GRACE), "--state", str(state), "--json"]
    return subprocess.Popen(args, cwd=soak.project, env=soak.run.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def after_a_failed_restart(soak, number: int, old_main: psutil.Process, state: Path) -> list[str]:
    """What an operator does once a restart failed: finish the job, whatever state it left.

    First, as an operator would, wait until the worker answers again: after
    the broker's restart a worker takes a while to reconnect, and a restart
    (its drain) refuses to stop a worker that does not answer.
    """
    if soak.process_pid(PROGRAM) is not None:
        soak.wait_worker()
    if old_main.is_running() and old_main.status() != psutil.STATUS_ZOMBIE and soak.process_pid(PROGRAM) == old_main.pid:
        requeued, _ = soak.restart("restart", number)  # nothing was stopped: run it again
        return requeued
    # It stopped the worker and stopped short: kill what the record holds, start it, requeue.
    if state.exists():
        res = soak.cli("kill", str(state), "--grace", str(soak.KILL_GRACE), "--json")
        if res.returncode != 0:
            raise soak.CycleFailed(f"kill after the failed restart exited {res.returncode}:\n{res.stderr}")
    if soak.process_pid(PROGRAM) is None:
        soak.run.ctl("start", f"{PROGRAM}:*", timeout=120)
    soak.wait_worker()
    return soak.requeue(state) if state.exists() else []


# ------------------------------------------------------------------ faults


@register("broker-down-at-savepid")
def broker_down_at_savepid(soak, number, state):
    """The broker is down when restart begins (savepid asks it for the active tasks): nothing may be stopped."""
    old_main = psutil.Process(soak.process_pid(PROGRAM))
    soak.redis.kill()
    try:
        proc = restart_cli(soak, state)
        out, err = proc.communicate(timeout=300)
    finally:
        broker_back(soak)
    soak.fault_notes.append(f"restart with the broker down exited {proc.returncode}")
    return after_a_failed_restart(soak, number, old_main, state), soak.program_innocents()


@register("broker-down-at-drain")
def broker_down_at_drain(soak, number, state):
    """The broker dies once savepid has written the record (the drain is under way), and comes back."""
    old_main = psutil.Process(soak.process_pid(PROGRAM))
    proc = restart_cli(soak, state)
    try:
        wait_for(lambda: state.exists() or proc.poll() is not None, HANDSHAKE, "restart's savepid record")
        if proc.poll() is not None:
            soak.missed("restart ended before its drain")
        else:
            soak.redis.kill()
            time.sleep(0.5)  # how long the broker stays down while the drain polls: the fault's length, not a wait
            broker_back(soak)
    finally:
        proc.communicate(timeout=300)
    soak.fault_notes.append(f"restart with the broker killed mid-drain exited {proc.returncode}")
    if proc.returncode == 0:
        soak.wait_worker()
        return soak.requeue(state), soak.program_innocents()
    return after_a_failed_restart(soak, number, old_main, state), soak.program_innocents()


@register("broker-down-at-requeue")
def broker_down_at_requeue(soak, number, state):
    """A restart, then the broker dies before requeue: requeue fails, the broker is back, requeue again."""
    soak.restart_only("restart", number, state)
    soak.redis.kill()
    try:
        res = soak.cli("requeue", str(state), "--json")
    finally:
        broker_back(soak)
    soak.fault_notes.append(f"requeue with the broker down exited {res.returncode}")
    soak.wait_worker()
    return soak.requeue(state), soak.program_innocents()


@register("supervisord-killed-mid-stop")
def supervisord_killed_mid_stop(soak, number, state):
    """``supervisorctl stop``; once the worker is STOPPING, SIGKILL supervisord; a new one's listener cleans up."""
    old_main = psutil.Process(soak.process_pid(PROGRAM))
    stop = subprocess.Popen([str(soak.BIN / "supervisorctl"), "-c", str(soak.run.conf_path), "stop", f"{PROGRAM}:*"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=soak.run.env)

    def stopping():
        return any(i["group"] == PROGRAM and i["statename"] == "STOPPING"
                   for i in soak.run.proxy().supervisor.getAllProcessInfo())
    try:
        wait_for(stopping, HANDSHAKE, "the worker to be STOPPING", interval=0.02)
        orphan_supervisord(soak)
    finally:
        stop.wait(60)
    saved = savepid(soak, state)
    return start_again(soak, old_main.pid, state, saved), soak.program_innocents()


@register("tool-killed-mid-kill", stubborn=True)
def tool_killed_mid_kill(soak, number, state):
    """supervisord SIGKILLed; ``kill STATE`` SIGKILLed once its first signals are logged; ``kill STATE`` again."""
    old_main = psutil.Process(soak.process_pid(PROGRAM))
    orphan_supervisord(soak)
    saved = savepid(soak, state)
    kill = subprocess.Popen([str(soak.BIN / "celery-supervise"), "-A", "demo", "kill", str(state), "--grace",
                             str(soak.KILL_GRACE)], cwd=soak.project, env=soak.run.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_intent(soak, lambda x: x.get("by") == kill.pid, "the kill's first intent line")
        kill.send_signal(signal.SIGKILL)
    except WaitTimeout:
        soak.missed("the kill logged no intent")
    finally:
        kill.wait(60)
    again = soak.cli("kill", str(state), "--grace", str(soak.KILL_GRACE), "--json")
    if again.returncode != 0:
        raise soak.CycleFailed(f"kill, run again after a SIGKILL, exited {again.returncode}:\n{again.stderr}")
    return start_again(soak, old_main.pid, state, saved), soak.program_innocents()


@register("listener-killed-mid-reap", stubborn=True)
def listener_killed_mid_reap(soak, number, state):
    """``supervisorctl restart``; the listener SIGKILLed once its reap has logged its first signals."""
    old_main = psutil.Process(soak.process_pid(PROGRAM))
    listener = soak.process_pid(soak.LISTENER)
    restart = subprocess.Popen([str(soak.BIN / "supervisorctl"), "-c", str(soak.run.conf_path), "restart",
                                f"{PROGRAM}:*"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=soak.run.env)
    try:
        wait_intent(soak, lambda x: x.get("by") == listener and f"@{old_main.pid}." in (x.get("record") or ""),
                    "the listener's reap to log its first intent")
        os.kill(listener, signal.SIGKILL)
    except WaitTimeout:
        soak.missed("the listener's reap logged no intent")
    finally:
        restart.wait(120)
    # supervisord starts the listener again; its start sweep finishes the reap.
    soak.wait_reaped(old_main.pid)
    soak.wait_worker()
    return [], soak.program_innocents()


@register("state-folder-full")
def state_folder_full(soak, number, state):
    """restart --state on a full filesystem: refused before anything is stopped; then with room again."""
    full = soak.full_dir()
    filler = full / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    old_main = psutil.Process(soak.process_pid(PROGRAM))
    try:
        proc = restart_cli(soak, full / state.name)
        proc.communicate(timeout=300)
    finally:
        filler.unlink()
    soak.fault_notes.append(f"restart with a full state folder exited {proc.returncode}")
    if proc.returncode == 0:
        soak.missed("restart wrote its record on a full filesystem")
        soak.wait_worker()
        return soak.requeue(full / state.name), soak.program_innocents()
    return after_a_failed_restart(soak, number, old_main, state), soak.program_innocents()


@register("clock-stepped")
def clock_stepped(soak, number, state):
    """supervisord SIGKILLed, savepid, then ``kill STATE`` with the wall clock stepped ±30 s.

    The kill is primed (``tests/programs/primed.py``: imported, waiting for
    go) so that the clock is wrong for the kill alone, well under a second,
    as in the tests' ``clockjump`` faults: this machine's clock is shared.
    """
    from test_faults import PRIMED, clock_set_by  # the tests' clockjump helpers: the clock is set right again

    old_main = psutil.Process(soak.process_pid(PROGRAM))
    orphan_supervisord(soak)
    saved = savepid(soak, state)
    step = soak.fault_rng.choice((30, -30))
    kill = subprocess.Popen([sys.executable, PRIMED, "cli", "kill", str(state), "--grace", str(soak.KILL_GRACE),
                             "--json"], cwd=soak.project, env=soak.run.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill.stdout.readline() != "ready\n":
        kill.kill()
        raise soak.CycleFailed(f"the primed kill did not get ready: {kill.communicate(timeout=30)[1]}")
    # Exclusive: every other soak on this machine is between two cycles (bench/clocklock.py). Taken
    # here, where this cycle has nothing the wall clock times (its supervisord is SIGKILLed, the kill
    # is waiting for go), so that waiting for it (the shared hold dropped) is safe while another steps.
    with soak.clock_lock.exclusive(), clock_set_by(step):
        out, err = kill.communicate("go\n", timeout=120)
    soak.fault_notes.append(f"kill with the clock stepped {step:+d} s exited {kill.returncode}"
                            f" (the clock lock came after {soak.clock_lock.waited:.1f} s)")
    if kill.returncode != 0:
        raise soak.CycleFailed(f"kill after a clock step exited {kill.returncode}:\n{err}")
    return start_again(soak, old_main.pid, state, saved), soak.program_innocents()


@register("child-ignores-sigterm", stubborn=True)
def child_ignores_sigterm(soak, number, state):
    """A task child that SIGTERM does not end: the cycle's own restart must SIGKILL it after the grace."""
    return soak.restart(soak.config.modes[(number - 1) % len(soak.config.modes)], number)


# ---------------------------------------------------------- escape routes

#: demo.tasks.ESCAPE_ROUTES (docs/escapes.md), in the order of their faults below.
ROUTES = ("double_fork", "process_group", "job_control", "pool_child")


def escape_then_restart(soak, number, route):
    """A task's children leave the tree and the process group by *route*, before savepid; then a usual restart.

    ``spawn_escapes`` starts three: attached (a process group of its own
    only: must die with the worker), setsid'd and nohup'd (must live). The
    soak tracks them from the marker on; nothing but the worker's cgroup
    still leads to them once they escaped.
    """
    main = psutil.Process(soak.process_pid(PROGRAM))
    marker = soak.spawn_escapes(route)
    if route == "pool_child":
        replace_pool_process(soak, psutil.Process(marker["pool_pid"]), main)
    below = {p.pid for p in main.children(recursive=True)}
    stayed = [v for v, pid in marker["children"].items() if pid in below or os.getpgid(pid) == main.pid]
    if stayed:
        soak.missed(f"{route}: {', '.join(stayed)} still in the worker's tree or group")
    # Round r of the table restarts route i the (r + i)-th way: each round uses
    # every way, and each route meets every way over as many rounds.
    round_ = (number - 1) // len(soak.faults())
    mode = soak.config.modes[(round_ + ROUTES.index(route)) % len(soak.config.modes)]
    soak.fault_notes.append(f"{route} escapes, then {mode}")
    return soak.restart(mode, number)


def replace_pool_process(soak, pool: psutil.Process, main: psutil.Process) -> None:
    """``pool_shrink`` (the call ``--autoscale`` makes) until *pool* is one that ended; then grow back.

    The pool ends only idle processes, the first idle one in its own order:
    each shrink ends one, whose end is waited for before the next.
    """
    control, node = soak.run.celery.app.control, soak.node

    def shrunk():
        replies = control.pool_shrink(1, destination=[node], reply=True, timeout=1)
        return any("ok" in r.get(node, {}) for r in replies or ())  # else every process was busy
    ended = 0
    try:
        while not is_gone(pool):
            before = [p for p in main.children() if not is_gone(p)]
            wait_for(shrunk, HANDSHAKE, "an idle pool process to shrink", interval=0.2)
            ended += 1
            # Wait until billiard has joined it (gone from the process table),
            # not only until it exited: an ended process stays in the pool's
            # list until the join, and a shrink before that may pick that dead
            # process again and end nothing. That was the "pool process ... was
            # not replaced" of about 1 in 15 escape-pool-child cycles.
            wait_for(lambda: any(not p.is_running() for p in before), HANDSHAKE, "the shrunk pool process to be joined")
    except WaitTimeout:
        soak.missed(f"pool process {pool.pid} was not replaced")
    finally:
        if ended:
            control.pool_grow(ended, destination=[node], reply=True, timeout=5)


@register("escape-double-fork", cgroup=True)
def escape_double_fork(soak, number, state):
    """Double fork; the grandchild calls ``setpgid`` (or ``setsid``) and runs ``sleep``."""
    return escape_then_restart(soak, number, "double_fork")


@register("escape-process-group", cgroup=True)
def escape_process_group(soak, number, state):
    """``subprocess.Popen(process_group=0)`` from a process that exits at once."""
    return escape_then_restart(soak, number, "process_group")


@register("escape-job-control", cgroup=True)
def escape_job_control(soak, number, state):
    """``bash -c 'set -m; sleep & …'``: each background job is a process group of its own."""
    return escape_then_restart(soak, number, "job_control")


@register("escape-pool-child", cgroup=True)
def escape_pool_child(soak, number, state):
    """The pool process starts them, then is replaced (an ``--autoscale`` shrink): they are re-parented."""
    return escape_then_restart(soak, number, "pool_child")
