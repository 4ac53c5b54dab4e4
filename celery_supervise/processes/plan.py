"""Deciding what to kill: a pure function of a snapshot and a policy.

Step two of snapshot -> plan -> act. Nothing here reads the system or sends
a signal, so every rule is unit-tested on hand-written trees::

    1000 celery worker (main)          kill    worker main process
    ├── 1001 pool                      kill    pool process
    │   ├── 1010 sleep                 kill    attached
    │   ├── 1011 nohup sleep           spare   nohup
    │   └── 1012 setsid sleep          spare   own session
    └── 1002 pool                      kill    pool process
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Iterable, Mapping

from ..errors import UsageError
from .procs import MAIN, POOL, Proc
from .snapshot import Worker

KILL = "kill"
SPARE = "spare"
REFUSE = "refuse"

SETSID = "setsid"  # spare descendants in another session than their worker
NOHUP = "nohup"  # spare descendants that ignore SIGHUP while their pool does not
PGROUP = "pgroup"  # spare descendants in another process group than their worker
SPARE_RULES = (SETSID, NOHUP, PGROUP)


@dataclass(frozen=True)
class Policy:
    """Which deliberately detached descendants to spare."""

    spare: frozenset[str] = frozenset({SETSID, NOHUP})

    @classmethod
    def parse(cls, text: str | None) -> "Policy":
        """Parse ``--spare``: a comma list of rules, or ``none``.

        The list is exactly the rules applied: ``setsid`` alone narrows the
        default, ``setsid,nohup,pgroup`` widens it.
        """
        if text is None:
            return cls()
        words = [w.strip().lower() for w in text.split(",") if w.strip()]
        if words == ["none"]:
            return cls(frozenset())
        unknown = [w for w in words if w not in SPARE_RULES]
        if unknown or not words:
            raise UsageError(
                f"--spare: unknown rule {', '.join(unknown) or repr(text)}; "
                f"use a comma list of {', '.join(SPARE_RULES)}, or none"
            )
        return cls(frozenset(words))

    def __str__(self) -> str:
        return ",".join(r for r in SPARE_RULES if r in self.spare) or "none"


@dataclass(frozen=True)
class Verdict:
    proc: Proc
    worker_pid: int
    action: str  # KILL, SPARE or REFUSE
    reason: str


def _origin(proc: Proc, tree: Mapping[int, Proc], main: Proc) -> Proc:
    """The main or pool process *proc* descends from.

    An orphan that was re-parented after its pool died has no recorded
    ancestor left; it came from this worker (it is in its process group),
    so the main stands in for the pool it came from.
    """
    seen = set()
    parent = tree.get(proc.ppid)
    while parent is not None and parent.pid not in seen:
        if parent.role in (MAIN, POOL):
            return parent
        seen.add(parent.pid)
        parent = tree.get(parent.ppid)
    return main


def orphans(main: Proc, holder: float | None, candidates: Iterable[Proc], known: Container[int] = ()) -> list[Proc]:
    """The recorded worker *main*'s orphans among *candidates* (live processes).

    What a stop leaves behind: task children whose pool process died, now
    re-parented to PID 1 or to supervisord itself when it is PID 1 (a
    container), and so found by no walk down the recorded tree. They keep
    the worker's PID as their process group, and that is how they are
    found: members of *main*'s group, in its session, born after it, and
    not already *known*.

    supervisord makes every program the leader of a process group of its
    own, so its other programs, children of the same parent as the
    orphans, are never in the worker's group. Nothing is adopted when
    *main* does not lead its group (a group shared with strangers), or
    when its PID now names another process (*holder* is the creation time
    of whatever holds it, ``None`` if nothing does): Linux never hands out
    a PID still in use as a process group ID, so while an orphan lives the
    number is the worker's, and once another process holds it the old
    group has died out and this one is somebody else's.
    """
    if main.pgid != main.pid:
        return []
    if holder is not None and not main.same_process(holder):
        return []
    # Joining a process group is only possible inside one session, and a
    # process born before the worker cannot be its child.
    return [p for p in candidates
            if p.pid not in known and p.pgid == main.pgid and p.sid == main.sid and p.create_time >= main.create_time]


def decide_worker(worker: Worker, policy: Policy, protected: Mapping[int, str] = {}) -> list[Verdict]:
    """One verdict per process of *worker*, parents decided before children.

    *protected* maps PIDs that must never be signalled (PID 1, this tool,
    its ancestors, supervisord) to the reason why. Their descendants in the
    tree are refused too: "below" means reached down the tree from a
    protected process (a record that names supervisord would otherwise
    bring in all its programs). A protected process that is not in the
    tree is nobody's ancestor here: an orphan re-parented to PID 1, or to
    supervisord as a container's PID 1, is judged on its own, as the
    worker's orphan it is (see :func:`orphans`).
    """
    tree = worker.by_pid()
    main = worker.main
    decided: dict[int, Verdict] = {}
    out: list[Verdict] = []
    for proc in worker.procs:
        action, reason = _decide(proc, tree, main, policy, protected, decided)
        verdict = Verdict(proc, main.pid, action, reason)
        decided[proc.pid] = verdict
        out.append(verdict)
    return out


def _decide(proc, tree, main, policy, protected, decided) -> tuple[str, str]:
    if proc.pid in protected:
        return REFUSE, protected[proc.pid]
    parent = decided.get(proc.ppid)
    # Below a protected process (supervisord, our own shell, ourselves) a
    # process is that one's child, not the worker's: supervisord's other
    # programs, the deploy script's other jobs. A record that names one with
    # its true identity must not make them "attached to the worker".
    if parent is not None and parent.action == REFUSE:
        if parent.reason.startswith("below "):
            return REFUSE, parent.reason
        return REFUSE, f"below {parent.proc.pid} ({parent.reason})"
    if proc.role == MAIN:
        return KILL, "worker main process"
    if proc.role == POOL:
        return KILL, "pool process"
    if parent is not None and parent.action == SPARE:
        return SPARE, f"child of spared {parent.proc.pid}"
    if SETSID in policy.spare and proc.sid != main.sid:
        return SPARE, "own session"
    # Every task child inherits the pool's ignored SIGINT, so only the SIGHUP
    # bit tells a nohup'd process, and only where its pool does not ignore it.
    if NOHUP in policy.spare and proc.sighup_ignored and not _origin(proc, tree, main).sighup_ignored:
        return SPARE, "nohup"
    if PGROUP in policy.spare and proc.pgid != main.pgid:
        return SPARE, "own process group"
    if proc.ppid not in tree and proc.pgid != main.pgid:
        # Found only through the worker's cgroup: it left the tree and the group, not the session.
        return KILL, "attached: escaped the tree and process group (in the worker's cgroup)"
    if proc.ppid not in tree:
        return KILL, "attached orphan of the worker"
    return KILL, "attached to the worker"


def plan(workers: Iterable[Worker], policy: Policy, protected: Mapping[int, str] = {}) -> list[Verdict]:
    """Verdicts for every process of every worker."""
    verdicts: list[Verdict] = []
    for worker in workers:
        verdicts.extend(decide_worker(worker, policy, protected))
    return verdicts
