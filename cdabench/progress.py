"""Progress for long stages: rich bars on a terminal, plain lines otherwise (CI logs). Listeners
(`listen`) see every advance of every bar: a dashboard, a log, or a test that interrupts a run
after N units of work, as Ctrl-C would. `Remaining` estimates the time left of work whose units
cost differently (a suite's cells: their planned optimiser steps)."""
from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
_quiet = False
_listeners: list[Callable[[Bar], None]] = []


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


class Bar(ABC):
    """One stage's progress: `done` of `total` units (cells, recover steps, batches)."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done = description, total, 0

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self._show(n, info)
        for listener in list(_listeners):
            listener(self)

    @abstractmethod
    def _show(self, n: int, info: str) -> None:
        """Draw the progress (a rich bar, or a plain line now and then)."""


class _PlainBar(Bar):
    """Prints a line at most every `every` seconds and at the end: readable in a CI log."""

    def __init__(self, description: str, total: int, every: float = 10.0):
        super().__init__(description, total)
        self.every, self.start, self.last, self.info = every, time.monotonic(), 0.0, ""

    def _show(self, n: int, info: str) -> None:
        self.info = info or self.info
        now = time.monotonic()
        if not _quiet and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            # One write per line: several processes (torchrun's ranks) share the stream, and print()
            # writes the text and its newline apart, so their lines could run into each other.
            sys.stderr.write(f"{self.description}: {self.done}/{self.total} {self.info} [{now - self.start:.1f}s]\n")
            sys.stderr.flush()


class _RichBar(Bar):
    def __init__(self, progress: Progress, description: str, total: int):
        super().__init__(description, total)
        self.progress, self.task = progress, progress.add_task(description, total=total, info="")

    def _show(self, n: int, info: str) -> None:
        self.progress.update(self.task, advance=n, info=info)


@contextmanager
def track(description: str, total: int):
    """`with track("recover", n) as bar: bar.advance(info="loss 1.2")`."""
    if _quiet or not console.is_terminal:
        yield _PlainBar(description, total)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=True) as progress:
        yield _RichBar(progress, description, total)


@contextmanager
def listen(listener: Callable[[Bar], None]):
    """Call `listener(bar)` after every advance of every bar (in any thread) inside the block;
    an exception it raises propagates from that `advance`, stopping the stage there."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class Remaining:
    """The time left of `total` planned cost, at the rate measured so far (cost done per second of
    wall time since the start, so work done in parallel processes counts as it finishes)."""

    def __init__(self, total: float, clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.clock, self.start = float(total), 0.0, clock, clock()

    def advance(self, cost: float) -> None:
        self.done += cost

    def seconds(self) -> float | None:
        """None until some cost is done."""
        if self.done <= 0:
            return None
        return max(0.0, self.total - self.done) * (self.clock() - self.start) / self.done

    def __str__(self) -> str:
        left = self.seconds()
        return "estimating the time left" if left is None else f"about {duration(left)} left"


def duration(seconds: float) -> str:
    """1h05m, 4m07s, 42s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def log(message: str) -> None:
    # soft_wrap: a message is one line however long (a terminal wraps it for the eye); rich's own
    # wrapping would break a path inside a CI log at column 80, where nobody can paste it back.
    if not _quiet:
        console.print(message, markup=False, highlight=False, soft_wrap=True)
