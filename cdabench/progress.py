"""Progress for long stages: rich bars on a terminal, plain lines otherwise (CI logs)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


class _PlainTask:
    """Prints a line at most every `every` seconds and at the end: readable in a CI log."""

    def __init__(self, description: str, total: int, every: float = 10.0):
        self.description, self.total, self.every = description, total, every
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.info = ""

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.info = info or self.info
        now = time.monotonic()
        if not _quiet and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            print(f"{self.description}: {self.done}/{self.total} {self.info} [{now - self.start:.1f}s]",
                  file=sys.stderr, flush=True)


class _RichTask:
    def __init__(self, progress: Progress, description: str, total: int):
        self.progress, self.task = progress, progress.add_task(description, total=total, info="")

    def advance(self, n: int = 1, info: str = "") -> None:
        self.progress.update(self.task, advance=n, info=info)


@contextmanager
def track(description: str, total: int):
    """`with track("recover", n) as bar: bar.advance(info="loss 1.2")`."""
    if _quiet or not console.is_terminal:
        yield _PlainTask(description, total)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=True) as progress:
        yield _RichTask(progress, description, total)


def log(message: str) -> None:
    if not _quiet:
        console.print(message, markup=False, highlight=False)
