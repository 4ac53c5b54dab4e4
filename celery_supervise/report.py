"""Rendering results for people (rich) and for automation (JSON).

Shared by the CLI and the Django command, so both print the same thing.
Results go to the *out* console; warnings go to *err* as ``warning:`` lines.
Every value that comes from outside (a command line, a task name, a state
file) is passed through :func:`rich.markup.escape`: a ``[/]`` in a task's
command line would otherwise be read as markup and fail the render.
"""

from __future__ import annotations

import json
import os
import re
from contextvars import ContextVar
from typing import Iterable

from rich.console import Console
from rich import markup
from rich.tree import Tree

from .drain import ACTIVE, RESERVED, Assessment, DrainResult
from .errors import EXIT_OK, EXIT_PARTIAL
from .kill import FAILED, GONE, KILLED, REFUSED, SPARED, WOULD_KILL, KillReport
from .operations import FAILED as REQUEUE_FAILED, RESENT, SKIPPED, WOULD_RESEND, RequeueResult, SaveResult, StatusResult
from .restart import RestartResult
from .plan import KILL, REFUSE, Verdict
from .statefile import Encoder, proc_to_dict, to_document

# C0 and C1 controls, and lone surrogates: the undecodable bytes of a
# /proc cmdline (or of a state file's strings) after Python's surrogateescape.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def escape(text: str) -> str:
    """Outside text (a command line, a task name), safe to print in a table.

    A control character would drive the user's terminal (an ESC sequence in
    a task's argv can rewrite the screen) and a lone surrogate would print as
    a raw, invalid UTF-8 byte; both are shown as ``\\xNN``. Rich markup is
    escaped too: a ``[/]`` in a command line would otherwise end the report
    with a MarkupError, after the signals were sent.
    """
    return markup.escape(_UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()) & 0xff:02x}", text))


STATUS_ORDER = (KILLED, WOULD_KILL, SPARED, GONE, REFUSED, FAILED)
REQUEUE_ORDER = (RESENT, WOULD_RESEND, REQUEUE_FAILED, SKIPPED)
STYLE = {RESENT: "green", WOULD_RESEND: "yellow", SKIPPED: "dim",
         KILLED: "red", WOULD_KILL: "yellow", SPARED: "green", GONE: "dim", REFUSED: "magenta", FAILED: "bold red",
         KILL: "red", "spare": "green", REFUSE: "magenta"}


#: Colour as a shell asks for it: None lets rich decide (a terminal,
#: ``NO_COLOR``, ``FORCE_COLOR``); False is no styling at all, True treats
#: the output as a terminal. The Django command sets it from its
#: ``--no-color``/``--force-color``.
COLOR: ContextVar[bool | None] = ContextVar("celery_supervise_color", default=None)


def consoles(out_file=None, err_file=None) -> tuple[Console, Console]:
    """Consoles for results and for warnings/progress.

    Off a terminal (a deploy log) rich would wrap at 80 columns; a wider
    page keeps one process on one line.
    """
    color = COLOR.get()
    style = {} if color is None else {"color_system": None} if color is False else {"force_terminal": True}

    def make(file, stderr):
        probe = Console(file=file, stderr=stderr, **style)
        return probe if probe.is_terminal else Console(file=file, stderr=stderr, width=160, **style)

    return make(out_file, False), make(err_file, True)


def display_command(cmdline, width: int = 48) -> str:
    """A short command: ``celery -A demo worker …`` rather than interpreter paths."""
    args = list(cmdline)
    if len(args) > 1 and os.path.basename(args[0]).startswith("python") and not args[1].startswith("-"):
        args = args[1:]
    if args:
        args[0] = os.path.basename(args[0])
    return short(" ".join(args) or "?", width)


def kill_exit_code(report: KillReport) -> int:
    return EXIT_PARTIAL if report.partial else EXIT_OK


def new_table(title: str):
    from rich.table import Table  # only the renderings that draw a table import it

    return Table(title=title, title_justify="left")


def short(command: str, width: int = 60) -> str:
    return command if len(command) <= width else command[: width - 1] + "…"


def warnings(err: Console, lines: Iterable[str]) -> None:
    for line in lines:
        err.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


def emit_json(out: Console, doc: dict) -> None:
    # Plain print: rich would re-wrap and colour the JSON.
    out.file.write(json.dumps(doc, indent=2, sort_keys=True, cls=Encoder) + "\n")
    out.file.flush()


# ---------------------------------------------------------------------- kill


def kill_document(report: KillReport) -> dict:
    return {
        "dry_run": report.dry_run,
        "exit_code": kill_exit_code(report),
        "summary": {s: len(report.by_status(s)) for s in STATUS_ORDER},
        "processes": [
            {
                **proc_to_dict(o.proc),
                "worker": o.worker_pid,
                "status": o.status,
                "reason": o.reason,
                "signal": o.signal,
            }
            for o in _ordered(report)
        ],
        "warnings": report.warnings,
    }


def _ordered(report: KillReport):
    return sorted(report.outcomes, key=lambda o: (STATUS_ORDER.index(o.status), o.worker_pid, o.proc.pid))


def summary_line(report: KillReport) -> str:
    counts = {s: len(report.by_status(s)) for s in STATUS_ORDER}
    first = f"would kill {counts[WOULD_KILL]}" if report.dry_run else f"killed {counts[KILLED]}"
    return (f"{first}, spared {counts[SPARED]}, already gone {counts[GONE]}, "
            f"refused {counts[REFUSED]}, failed {counts[FAILED]}")


def render_kill(out: Console, err: Console, report: KillReport, as_json: bool) -> int:
    warnings(err, report.warnings)
    if as_json:
        emit_json(out, kill_document(report))
        return kill_exit_code(report)
    print_kill(out, report)
    return kill_exit_code(report)


def print_kill(out: Console, report: KillReport) -> None:
    """The kill's table (what was killed, spared, refused… and why) and its summary line."""
    title = "celery-supervise kill (dry run: nothing signalled)" if report.dry_run else "celery-supervise kill"
    table = new_table(title)
    for col in ("outcome", "pid", "role", "worker", "command", "reason"):
        table.add_column(col, overflow="fold")
    for o in _ordered(report):
        detail = o.reason if o.signal is None else f"{o.reason} ({o.signal})"
        table.add_row(f"[{STYLE[o.status]}]{o.status}[/]", str(o.proc.pid), escape(o.proc.role), str(o.worker_pid),
                      escape(display_command(o.proc.cmdline)), escape(detail))
    if report.outcomes:
        out.print(table)
    out.print(summary_line(report), highlight=False)


# ------------------------------------------------------------------- savepid


def save_document(result: SaveResult) -> dict:
    doc = to_document(result.snapshot, result.policy, result.verdicts)
    doc["path"] = result.path
    doc["broker_error"] = result.broker_error
    doc["exit_code"] = save_exit_code(result)
    return doc


def save_summary(result: SaveResult) -> dict:
    """What savepid recorded, in numbers (the record itself is the state file)."""
    workers = result.snapshot.workers
    return {"path": result.path, "source": result.snapshot.source, "workers": len(workers),
            "processes": sum(len(w.procs) for w in workers),
            "already_orphaned": sum(len(already_orphaned(w)) for w in workers),
            "tasks": sum(len(w.tasks) for w in workers), "policy": str(result.policy)}


def save_exit_code(result: SaveResult) -> int:
    """3 when the broker failed: the record lacks the tasks a stop would cut off (requeue could not re-send them)."""
    return EXIT_PARTIAL if result.broker_error else EXIT_OK


def save_problem(result: SaveResult) -> str:
    return (f"the broker failed ({result.broker_error}): {result.path} records the process trees but not the "
            "active tasks, so requeue could not re-send what a stop cuts off; run savepid again once the "
            "broker is back (kill works with this record)")


def render_save(out: Console, err: Console, result: SaveResult, as_json: bool) -> int:
    warnings(err, [w for w in result.warnings if not (result.broker_error and w.startswith(result.broker_error))])
    if result.broker_error:
        # One line, as every error; the CLI's edge prints SuperviseErrors
        # the same way, but the record *was* written, so this is exit 3.
        err.print(f"celery-supervise: error: {save_problem(result)}", highlight=False, soft_wrap=True)
    if as_json:
        emit_json(out, save_document(result))
        return save_exit_code(result)
    snap = result.snapshot
    nprocs = sum(len(w.procs) for w in snap.workers)
    ntasks = sum(len(w.tasks) for w in snap.workers)
    out.print(
        f"recorded {len(snap.workers)} worker(s), {nprocs} process(es), {ntasks} active task(s) "
        f"in {result.path} (found by {snap.source}, spare {result.policy})",
        highlight=False,
    )
    if snap.workers:
        out.print(verdict_tree(snap.workers, result.verdicts))
    return save_exit_code(result)


# -------------------------------------------------------------------- status


def status_document(result: StatusResult) -> dict:
    doc = to_document(result.snapshot, result.policy, result.verdicts)
    for w, entry in zip(result.snapshot.workers, doc["workers"]):
        entry["containment"] = containment(w)
    return doc


def containment(worker) -> str:
    """Which mechanism finds *worker*'s escaped children: ``cgroup <path>`` or ``process group only: <why>``."""
    from .cgroups import describe

    return describe(worker.cgroup, worker.cgroup_reason)


def already_orphaned(worker) -> set[int]:
    """PIDs of *worker*'s processes whose parent is outside its tree (re-parented to PID 1 or a subreaper)."""
    pids = {p.pid for p in worker.procs}
    return {p.pid for p in worker.procs if p.pid != worker.main.pid and p.ppid not in pids}


def verdict_tree(workers, verdicts: list[Verdict]):
    by_key = {(v.worker_pid, v.proc.pid): v for v in verdicts}
    trees = []
    for w in workers:
        label = f"[bold]{escape(w.node or 'worker')}[/] main {w.main.pid}"
        if w.program:
            label += f", program {escape(w.program)}"
        label += f", {len(w.tasks)} active task(s)"
        orphans = already_orphaned(w)
        if orphans:
            label += f", {len(orphans)} process(es) already orphaned"
        root = Tree(label)
        nodes = {}
        for p in w.procs:
            v = by_key.get((w.main.pid, p.pid))
            verdict = f"[{STYLE.get(v.action, '')}]{v.action}[/] {escape(v.reason)}" if v else ""
            text = f"{p.pid} {p.role:<4} {escape(display_command(p.cmdline))}  {verdict}"
            if p.pid in orphans:
                text += f" [dim](orphaned: parent now PID {p.ppid})[/]"
            parent = nodes.get(p.ppid, root) if p.pid != w.main.pid else root
            nodes[p.pid] = parent.add(text, highlight=False)
        for t in w.tasks:
            root.add(escape(f"task {t.id} {t.name} on pool {t.worker_pid}"), style="dim")
        trees.append(root)
    if len(trees) == 1:
        return trees[0]
    top = Tree("workers")
    for t in trees:
        top.children.append(t)
    return top


def render_status(out: Console, err: Console, result: StatusResult, as_json: bool) -> int:
    warnings(err, result.warnings)
    if as_json:
        emit_json(out, status_document(result))
        return EXIT_OK
    if not result.snapshot.workers:
        out.print("no Celery worker is running on this host")
        return EXIT_OK
    out.print(verdict_tree(result.snapshot.workers, result.verdicts))
    for w in result.snapshot.workers:
        out.print(escape(f"worker {w.node or '?'} main {w.main.pid}: {containment(w)}"), highlight=False, soft_wrap=True)
    return EXIT_OK


# ------------------------------------------------------------------ progress


class WaitProgress:
    """``on_wait`` callback: a live status line on a TTY, plain lines otherwise.

    Plain lines come at most once a second so a log is not flooded.
    """

    def __init__(self, err: Console, what: str = "to exit after SIGTERM"):
        self.err = err
        self.what = what
        self.status = None
        self.last_line = None

    def __call__(self, left: int, elapsed: float, timeout: float) -> None:
        text = f"waiting for {left} process(es) {self.what}: {elapsed:.1f}s of {timeout:g}s"
        if self.err.is_terminal:
            if self.status is None:
                self.status = self.err.status(text)
                self.status.start()
            else:
                self.status.update(text)
        elif self.last_line is None or elapsed - self.last_line >= 1.0:
            self.last_line = elapsed
            self.err.print(text, highlight=False)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


# --------------------------------------------------------------------- drain


def drain_exit_code(result: DrainResult) -> int:
    """0 when drained; 3 (partial) when the timeout passed first."""
    return EXIT_OK if result.drained else EXIT_PARTIAL


def _seconds(value) -> float | None:
    return None if value is None else round(value, 3)


def drain_document(result: DrainResult) -> dict:
    busy = {h.node for h in result.held}
    return {
        "drained": result.drained,
        "exit_code": drain_exit_code(result),
        "elapsed": round(result.elapsed, 3),
        "timeout": result.timeout,
        "finished_at": result.finished_at,
        "all": result.everyone,
        "workers": [
            {"node": t.node, "pid": t.pid, "queues": result.queues_of(t.node),
             "answered": t.node not in result.silent,
             "drained": t.node not in busy and t.node not in result.silent}
            for t in result.targets
        ],
        "cancelled": [{"queue": q, "nodes": None if nodes is None else list(nodes)} for q, nodes in result.cancelled],
        "tasks": [
            {"node": h.node, "id": h.task.id, "name": h.task.name, "state": h.state,
             "runtime": _seconds(h.runtime(result.finished_at)), "time_start": h.task.time_start,
             "worker_pid": h.task.worker_pid, "args": h.task.args, "kwargs": h.task.kwargs}
            for h in result.held
        ],
        "not_answering": list(result.silent),
        "warnings": result.warnings,
    }


def _runtime_text(held, now: float) -> str:
    runtime = held.runtime(now)
    if runtime is None:
        return "not started" if held.state == RESERVED else "?"
    return f"{runtime:.1f}s"


def drain_summary(result: DrainResult) -> str:
    if result.drained:
        return f"drained {len(result.targets)} worker(s) in {result.elapsed:.1f}s"
    parts = []
    if result.held:
        running = sum(1 for h in result.held if h.state == ACTIVE)
        waiting = len(result.held) - running
        nodes = len({h.node for h in result.held})
        parts.append(f"{running} task(s) still running{f' and {waiting} prefetched' if waiting else ''} "
                     f"on {nodes} worker(s)")
    if result.silent:
        parts.append(f"{len(result.silent)} worker(s) did not answer ({', '.join(result.silent)})")
    return f"timed out after {result.elapsed:.1f}s: " + "; ".join(parts)


def render_drain(out: Console, err: Console, result: DrainResult, as_json: bool) -> int:
    warnings(err, result.warnings)
    if as_json:
        emit_json(out, drain_document(result))
        return drain_exit_code(result)
    if not result.drained and result.held:
        table = new_table("celery-supervise drain: still running")
        for col in ("node", "task id", "name", "state", "runtime", "pool pid"):
            table.add_column(col, overflow="fold")
        for h in result.held:
            table.add_row(escape(h.node), escape(h.task.id), escape(h.task.name), h.state,
                          _runtime_text(h, result.finished_at),
                          str(h.task.worker_pid or "-"))
        out.print(table)
    out.print(drain_summary(result), highlight=False)
    if result.drained:
        for t in result.targets:
            pid = f" (PID {t.pid})" if t.pid else ""
            queues = ", ".join(result.queues_of(t.node)) or "nothing"
            out.print(f"  {t.node}{pid}: no longer consumes {queues}", highlight=False, markup=False)
    return drain_exit_code(result)


class DrainProgress:
    """``on_progress`` callback of a drain: a progress bar on a TTY, plain lines otherwise.

    The bar counts finished tasks out of the most seen at once; the line
    says what is left, the elapsed time and the timeout. Plain lines come at
    most once a second.
    """

    def __init__(self, err: Console):
        self.err = err
        self.progress = None
        self.bar = None
        self.most = 0
        self.last_line = None

    @staticmethod
    def describe(assessment: Assessment) -> str:
        running = sum(1 for h in assessment.held if h.state == ACTIVE)
        waiting = len(assessment.held) - running
        text = f"{len(assessment.held)} task(s) left"
        if waiting:
            text += f" ({running} running, {waiting} prefetched)"
        if assessment.silent:
            text += f", {len(assessment.silent)} worker(s) not answering"
        return text

    def __call__(self, assessment: Assessment, elapsed: float, timeout: float) -> None:
        left = len(assessment.held)
        self.most = max(self.most, left)
        text = self.describe(assessment)
        if self.err.is_terminal:
            if self.progress is None:
                from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                self.progress = Progress(
                    SpinnerColumn(), TextColumn("draining"), BarColumn(), TextColumn("{task.description}"),
                    TimeElapsedColumn(), TextColumn("of {task.fields[timeout]:g}s"),
                    console=self.err, transient=True,
                )
                self.progress.start()
                self.bar = self.progress.add_task(text, total=max(self.most, 1), timeout=timeout)
            self.progress.update(self.bar, description=text, total=max(self.most, 1),
                                 completed=self.most - left if self.most else 1)
        elif self.last_line is None or elapsed - self.last_line >= 1.0:
            self.last_line = elapsed
            self.err.print(f"draining: {text}, {elapsed:.1f}s of {timeout:g}s", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ------------------------------------------------------------------- requeue


def requeue_exit_code(result: RequeueResult) -> int:
    """0 when done; 3 (partial) when the broker failed after some tasks were re-sent."""
    return EXIT_PARTIAL if result.partial else EXIT_OK


def requeue_document(result: RequeueResult) -> dict:
    def route(r):
        return None if r is None else {"exchange": r.exchange, "routing_key": r.routing_key,
                                       "queue": r.queue, "priority": r.priority}

    return {
        "dry_run": result.dry_run,
        "exit_code": requeue_exit_code(result),
        "state_file": result.path,
        "ledger": result.ledger,
        "journal": result.journal,
        "summary": {s: len(result.by_status(s)) for s in REQUEUE_ORDER},
        "tasks": [
            {"id": o.decision.task.id, "name": o.decision.task.name, "args": o.decision.task.args,
             "kwargs": o.decision.task.kwargs, "node": o.decision.recorded.node,
             "worker": o.decision.recorded.worker, "acknowledged": o.decision.task.acknowledged,
             "status": o.status, "reason": o.reason, "route": route(o.decision.route)}
            for o in result.outcomes
        ],
        "warnings": result.warnings,
    }


def requeue_summary(result: RequeueResult) -> str:
    counts = {s: len(result.by_status(s)) for s in REQUEUE_ORDER}
    first = f"would re-send {counts[WOULD_RESEND]}" if result.dry_run else f"re-sent {counts[RESENT]}"
    line = f"{first}, skipped {counts[SKIPPED]}"
    if counts[REQUEUE_FAILED]:
        line += f", failed {counts[REQUEUE_FAILED]}"
    return line + f" of {len(result.outcomes)} recorded task(s)"


def render_requeue(out: Console, err: Console, result: RequeueResult, as_json: bool) -> int:
    from . import requeue as requeuing

    warnings(err, result.warnings)
    if as_json:
        emit_json(out, requeue_document(result))
        return requeue_exit_code(result)
    title = "celery-supervise requeue (dry run: nothing sent)" if result.dry_run else "celery-supervise requeue"
    table = new_table(title)
    for col in ("outcome", "task id", "name", "queue", "node", "reason"):
        table.add_column(col, overflow="fold")
    for o in result.outcomes:
        d = o.decision
        # A skipped task has no route to send it on, but the one it came by still tells which it was.
        table.add_row(f"[{STYLE[o.status]}]{o.status}[/]", escape(d.task.id), escape(d.task.name),
                      escape((d.route or requeuing.route_of(d.task)).describe()), escape(d.recorded.node or "-"),
                      escape(o.reason))
    if result.outcomes:
        out.print(table)
    out.print(requeue_summary(result), highlight=False)
    return requeue_exit_code(result)


# ------------------------------------------------------------------- restart


def restart_document(result: RestartResult) -> dict:
    return {
        "exit_code": result.exit_code,
        "processes": result.processes,
        "phases": [{"name": p.name, "seconds": round(p.seconds, 3), "detail": p.detail} for p in result.phases],
        "total": round(result.total, 3),
        "consume_gap": _seconds(result.consume_gap),
        "consume_gaps": {n: round(s, 3) for n, s in result.consume_gaps.items()},
        "old_nodes": result.nodes,
        "new_nodes": {n: _seconds(s) for n, s in result.new_nodes.items()},
        "stopped": result.stopped,
        "started": result.started,
        "drain": drain_document(result.drain) if result.drain is not None else None,
        "kill": None if result.kill is None else {
            "summary": {s: len(result.kill.by_status(s)) for s in STATUS_ORDER},
            "failed": [{**proc_to_dict(o.proc), "reason": o.reason} for o in result.kill.by_status(FAILED)],
        },
        "state_file": result.state_file,
        "problem": result.problem,
        "warnings": result.warnings,
    }


def render_restart(out: Console, err: Console, result: RestartResult, as_json: bool) -> int:
    """A phase table on a terminal, one plain line per phase otherwise."""
    warnings(err, result.warnings)
    if as_json:
        emit_json(out, restart_document(result))
        return result.exit_code
    if result.drain is not None and not result.drain.drained:
        render_drain(out, err, result.drain, False)
    gap = result.consume_gap
    gap_text = ("consume gap: n/a (no worker was drained, or none answered)" if gap is None else
                f"consume gap: {gap:.2f}s (old workers' cancels sent -> new workers answer a ping)")
    if out.is_terminal:
        table = new_table(f"celery-supervise restart {' '.join(result.processes)}")
        for col, justify in (("phase", "left"), ("time", "right"), ("what happened", "left")):
            table.add_column(col, justify=justify, overflow="fold")
        for p in result.phases:
            table.add_row(p.name, f"{p.seconds:.2f}s", escape(p.detail))
        table.add_row("[bold]total[/]", f"{result.total:.2f}s", "")
        out.print(table)
    else:
        for p in result.phases:
            out.print(f"{p.name:<8} {p.seconds:7.2f}s  {p.detail}", highlight=False, markup=False)
        out.print(f"{'total':<8} {result.total:7.2f}s", highlight=False)
    out.print(gap_text, highlight=False, markup=False)
    if result.kill is not None and result.kill.partial:
        for o in result.kill.by_status(FAILED):
            out.print(f"  not killed: {o.proc.pid} {display_command(o.proc.cmdline)}: {o.reason}",
                      highlight=False, markup=False)
    if result.state_file:
        out.print(f"record: {result.state_file}", highlight=False, markup=False)
    if result.problem:
        out.print(f"not done: {result.problem}", highlight=False, markup=False)
    return result.exit_code


# -------------------------------------------------------------- print-config


def render_print_config(out: Console, err: Console, result, as_json: bool) -> int:
    """The snippet exactly as built (no rich markup or wrapping), or its document."""
    warnings(err, result.warnings)
    if as_json:
        emit_json(out, result.to_document())
    else:
        out.file.write(result.text)
        out.file.flush()
    return result.exit_code


# -------------------------------------------------------------------- deploy


class DeployProgress:
    """A deploy's progress on stderr: one line per step, as scripts/deploy.sh printed them.

    Every line starts with *name* (``celery-supervise deploy``, or the name a
    wrapper script sets); waits say how long so far every 5 seconds.
    """

    EVERY = 5.0

    def __init__(self, err: Console, name: str):
        self.err = err
        self.name = name
        self.said = 0.0  # elapsed time of the wait's last line
        self.last = 0.0  # elapsed time last reported: a smaller one starts a new wait

    def line(self, text: str) -> None:
        self.err.print(f"{self.name}: {text}", highlight=False, markup=False, soft_wrap=True)

    def step(self, number: int, total: int, text: str) -> None:
        self.line(f"{number}/{total} {text}")

    def note(self, text: str) -> None:
        self.line(text)

    def waiting(self, what: str, elapsed: float, timeout: float | None) -> None:
        if elapsed < self.last:
            self.said = 0.0
        self.last = elapsed
        if elapsed - self.said < self.EVERY:
            return
        self.said = elapsed
        self.line(f"   waiting {what}: {int(elapsed)}s" + (f" of {timeout:g}s" if timeout else ""))


def deploy_tasks_lines(result) -> list[str]:
    """The summary's word on every recorded task that did not finish, and how to re-send it."""
    tasks = result.tasks
    if result.save is None:
        return []
    if not tasks:
        return ["tasks: none was running at savepid"]
    if result.dry_run:
        lines = [f"tasks: {len(tasks)} running now (a stop may cut them off):"]
    else:
        unfinished = [t for t in tasks if not t.finished]
        unknown = sum(1 for t in unfinished if t.fate == "unknown")
        lines = [f"tasks: {len(tasks)} running at savepid; finished since: {len(tasks) - len(unfinished)}; "
                 f"did not finish: {len(unfinished) - unknown}" + (f"; unknown: {unknown}" if unknown else "")
                 + (":" if unfinished else "")]
        tasks = unfinished
    for t in tasks:
        action = "" if t.action in ("-", SKIPPED) else f" [{t.action}]"
        lines.append(f"  {t.fate:<17} {t.id} {t.name} ({t.node or '?'}): {t.reason}{action}")
    if result.requeue_command:
        lines.append(f"re-send them with: {result.requeue_command}")
    return lines


def render_deploy(out: Console, err: Console, result, as_json: bool, name: str) -> int:
    """stdout: the kill's table, the phases, the tasks that did not finish; stderr ends with the error, if any."""
    warnings(err, result.warnings)
    if result.cause:
        err.print(f"{name}: {result.cause}", highlight=False, markup=False, soft_wrap=True)
    if as_json:
        emit_json(out, result.to_document())
    else:
        if result.kill is not None:
            print_kill(out, result.kill)
        for p in result.phases:
            out.print(f"{p.name:<9} {p.seconds:7.2f}s  {p.detail}", highlight=False, markup=False)
        if result.phases:
            out.print(f"{'total':<9} {result.total:7.2f}s", highlight=False)
        for line in deploy_tasks_lines(result):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        if result.kept and result.save is not None:
            out.print(f"record: {result.state_file}", highlight=False, markup=False, soft_wrap=True)
    out.file.flush()
    if result.problem:
        err.print(f"{name}: error: {result.problem}", highlight=False, markup=False, soft_wrap=True)
    return result.exit_code
