"""Rendering results for people (rich) and for automation (JSON).

Shared by the CLI and the Django command, so both print the same thing.
Results go to the *out* console; warnings go to *err* as ``warning:`` lines.
Nothing is decided here: each verb's result knows its exit code and its JSON
document (``exit_code``, ``to_document()``), and error lines are printed at
the shells' edges.

Every value that comes from outside (a command line, a task name, a state
file) is passed through :func:`rich.markup.escape`: a ``[/]`` in a task's
command line would otherwise be read as markup and fail the render.
"""

from __future__ import annotations

import json
import os
import re
from contextvars import ContextVar
from typing import TYPE_CHECKING, Iterable

from rich.console import Console
from rich import markup
from rich.tree import Tree

from .celery_side.task_json import Encoder
from .commands.requeue import RESENT, SKIPPED, WOULD_RESEND
from .processes.kill import FAILED, GONE, KILLED, REFUSED, SPARED, WOULD_KILL, KillReport
from .processes.plan import KILL, REFUSE, Verdict
from .progress import DeployProgress, DrainProgress, WaitProgress  # noqa: F401  (the shells find them here)

if TYPE_CHECKING:  # savepid, status and kill render without importing drain and restart (start-up time)
    from .celery_side.drain import DrainResult
    from .commands.requeue import RequeueResult
    from .commands.restart import RestartResult
    from .commands.savepid import SaveResult, StatusResult

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


def render_kill(out: Console, err: Console, report: KillReport, as_json: bool) -> int:
    warnings(err, report.warnings)
    if as_json:
        emit_json(out, report.to_document())
        return report.exit_code
    print_kill(out, report)
    return report.exit_code


def print_kill(out: Console, report: KillReport) -> None:
    """The kill's table (what was killed, spared, refused… and why) and its summary line."""
    title = "celery-supervise kill (dry run: nothing signalled)" if report.dry_run else "celery-supervise kill"
    table = new_table(title)
    for col in ("outcome", "pid", "role", "worker", "command", "reason"):
        table.add_column(col, overflow="fold")
    for o in report.ordered():
        detail = o.reason if o.signal is None else f"{o.reason} ({o.signal})"
        table.add_row(f"[{STYLE[o.status]}]{o.status}[/]", str(o.proc.pid), escape(o.proc.role), str(o.worker_pid),
                      escape(display_command(o.proc.cmdline)), escape(detail))
    if report.outcomes:
        out.print(table)
    out.print(report.summary(), highlight=False)


# ------------------------------------------------------------------- savepid


def render_save(out: Console, err: Console, result: SaveResult, as_json: bool) -> int:
    # The broker's failure is the result's problem, printed once by the
    # shell's edge (the record *was* written, so it is exit 3, not an error).
    warnings(err, [w for w in result.warnings if not (result.broker_error and w.startswith(result.broker_error))])
    if as_json:
        emit_json(out, result.to_document())
        return result.exit_code
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
    return result.exit_code


# -------------------------------------------------------------------- status


def verdict_tree(workers, verdicts: list[Verdict]):
    by_key = {(v.worker_pid, v.proc.pid): v for v in verdicts}
    trees = []
    for w in workers:
        label = f"[bold]{escape(w.node or 'worker')}[/] main {w.main.pid}"
        if w.program:
            label += f", program {escape(w.program)}"
        label += f", {len(w.tasks)} active task(s)"
        orphans = w.already_orphaned()
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
        emit_json(out, result.to_document())
        return result.exit_code
    if not result.snapshot.workers:
        out.print("no Celery worker is running on this host")
        return result.exit_code
    out.print(verdict_tree(result.snapshot.workers, result.verdicts))
    # Which mechanism finds each worker's escaped children (the result decides, see StatusResult).
    for w, line in zip(result.snapshot.workers, result.containment()):
        out.print(escape(f"worker {w.node or '?'} main {w.main.pid}: {line}"), highlight=False, soft_wrap=True)
    return result.exit_code


# --------------------------------------------------------------------- drain


def _runtime_text(held, now: float) -> str:
    from .celery_side.drain import RESERVED

    runtime = held.runtime(now)
    if runtime is None:
        return "not started" if held.state == RESERVED else "?"
    return f"{runtime:.1f}s"


def drain_summary(result: DrainResult) -> str:
    if result.drained:
        return f"drained {len(result.targets)} worker(s) in {result.elapsed:.1f}s"
    from .celery_side.drain import ACTIVE

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
        emit_json(out, result.to_document())
        return result.exit_code
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
    return result.exit_code


# ------------------------------------------------------------------- requeue


def render_requeue(out: Console, err: Console, result: RequeueResult, as_json: bool) -> int:
    from .celery_side import requeue as requeuing

    warnings(err, result.warnings)
    if as_json:
        emit_json(out, result.to_document())
        return result.exit_code
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
    out.print(result.summary(), highlight=False)
    return result.exit_code


# ------------------------------------------------------------------- restart


def render_restart(out: Console, err: Console, result: RestartResult, as_json: bool) -> int:
    """A phase table on a terminal, one plain line per phase otherwise."""
    warnings(err, result.warnings)
    if as_json:
        emit_json(out, result.to_document())
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


class RollProgress:
    """``restart --rolling``'s ``on_phase``: one line per phase of each batch, with the time so far."""

    def __init__(self, err: Console):
        self.err = err

    def __call__(self, number: int, total: int, phase: str, elapsed: float) -> None:
        self.err.print(f"batch {number}/{total}: {phase} ({elapsed:.1f}s)", highlight=False, markup=False)


def render_rolling(out: Console, err: Console, result, as_json: bool, shown: Iterable[str] = ()) -> int:
    """``restart --rolling``: its document, or one plain line per batch phase and queue.

    Warnings already *shown* (the plan's, before the roll) are not repeated on stderr.
    """
    shown = set(shown)
    warnings(err, [w for w in result.warnings if w not in shown])
    if as_json:
        emit_json(out, result.to_document())
        return result.exit_code
    for batch in result.batches:
        if batch.drain is not None and not batch.drain.drained:
            render_drain(out, err, batch.drain, False)
    for line in result.lines():
        out.print(line, highlight=False, markup=False)
    return result.exit_code


def render_restart_preview(out: Console, err: Console, result, as_json: bool) -> int:
    """``restart --dry-run``: the steps it would take, the tasks it would wait for, the kill's verdicts."""
    warnings(err, result.warnings)
    if as_json:
        emit_json(out, result.to_document())
        return result.exit_code
    rolling = " --rolling" if result.plan is not None else ""
    out.print(f"celery-supervise restart{rolling} {' '.join(result.processes)} "
              "(dry run: nothing drained, stopped, signalled or started)", highlight=False, markup=False)
    for step in result.steps():
        out.print(f"  would {step}", highlight=False, markup=False, soft_wrap=True)
    tasks = result.tasks
    out.print(f"tasks running now: {len(tasks)}" + (" (the drain waits for them; nothing is cut off)" if tasks else ""),
              highlight=False, markup=False)
    for node, t in tasks:
        out.print(f"  {t.id} {t.name} ({node or '?'})", highlight=False, markup=False, soft_wrap=True)
    if result.kill is not None:
        print_kill(out, result.kill)
    out.file.flush()
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


def render_deploy(out: Console, err: Console, result, as_json: bool) -> int:
    """stdout: the kill's table, the phases, the tasks that did not finish (the error lines are the shell's)."""
    warnings(err, result.warnings)
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
    return result.exit_code


# --------------------------------------------------------------------- audit


def render_audit(out: Console, err: Console, result, as_json: bool) -> int:
    """One row per signal of the audit log: intent joined to outcome."""
    warnings(err, result.warnings)
    if as_json:
        emit_json(out, result.to_document())
        return result.exit_code
    table = new_table(f"celery-supervise audit: {escape(result.path)}")
    for col in ("time (UTC)", "command", "uid", "pid", "process", "signal", "reason", "outcome"):
        table.add_column(col, overflow="fold")
    for r in result.rows:
        outcome = "[red]no outcome: the run died mid-signal[/]" if r.outcome is None else escape(r.outcome)
        table.add_row(escape(r.time.replace("T", " ").rstrip("Z")[:23]), escape(r.verb), str(r.uid), str(r.pid),
                      escape(display_command(r.cmdline)), escape(r.signal), escape(r.reason), outcome)
    if result.rows:
        out.print(table)
    unfinished = result.unfinished
    out.print(f"{len(result.rows)} signal(s)" + (f", {unfinished} without an outcome" if unfinished else ""),
              highlight=False)
    return result.exit_code
