"""Killing a run part-way, as Ctrl-C would: a progress listener (cdabench.progress.listen) raises
KeyboardInterrupt from inside the stage, at the point where its own bar reports the unit of work
(a suite's cell, a recover step) that the test names. The tests of resuming use it; production
code has no parameter for it."""
from __future__ import annotations

from contextlib import contextmanager

from cdabench import progress


@contextmanager
def interrupt_at(bar: str, units: int):
    """KeyboardInterrupt from the `advance` that brings a bar whose description starts with `bar`
    to `units` units done (a suite's bar counts cells, "recover" counts shard steps)."""
    def listener(b: progress.Bar) -> None:
        if b.description.startswith(bar) and b.done >= units:
            raise KeyboardInterrupt(f"interrupted at {b.done}/{b.total} of {b.description!r}")
    with progress.listen(listener):
        yield


@contextmanager
def bars_seen():
    """{description: (done, total)} of every bar that advanced inside the block."""
    seen: dict[str, tuple[int, int]] = {}

    def listener(b: progress.Bar) -> None:
        seen[b.description] = (b.done, b.total)
    with progress.listen(listener):
        yield seen
