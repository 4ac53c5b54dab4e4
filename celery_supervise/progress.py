"""Progress on stderr while a verb waits: a live line or bar on a terminal, plain lines in a log.

Each class is a callback a verb is handed (``on_wait``, ``on_progress``, a
deploy's ``progress``); it draws, and decides nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:  # the kill's progress does not import the drain (start-up time)
    from .celery_side.drain import Assessment


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
        from .celery_side.drain import ACTIVE

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
