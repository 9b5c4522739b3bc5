"""What the harness runs and shares, whatever the suite's kind: a `Job` (one cell: its key, its
name, its cost and the function that measures it), the process-local `Session` a job runs in,
the distilled sets cells share (one folder per method, IPC and seed), and how jobs are dealt
across torchrun's ranks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cdabench import artifacts
from cdabench.config import load_method, method_uses_seed, recover_config
from cdabench.distill.squeeze import Teacher, get_teacher, teacher_key
from cdabench.engine.context import Context
from cdabench.engine.runtime import ProcessGroup
from cdabench.engine.watch import Watch


@dataclass(frozen=True)
class Job:
    """One cell to run. `run(session, **args)` returns its record (not yet written); it must be a
    module-level function and `args` picklable, so a worker process can run it."""

    key: str                       # everything the result depends on (the cell_key of its record)
    name: str                      # the cell's readable name
    steps: int                     # optimiser steps, an estimate: longest jobs are dealt first
    run: Callable[..., dict]
    args: dict = field(default_factory=dict)
    student: str | None = None     # with the task and the name, which cell it is (a continual name omits it)


class Session:
    """One process's view for running cells: the context as a plain single process (no process
    group), its teacher (made or loaded when a cell first needs it) and a memo of what several
    cells reuse (memories, scenarios). `make_teacher`: how the teacher is made (the harness's
    parent passes the collective one, trained data-parallel under torchrun; default: this
    context's, from the cache). `make_stages`: whether a plan may make the shared stages (the
    teacher, the distilled sets); False in a shard of a suite, which only reads them back.
    `watch`: how cells are watched (curve points, loggers); it changes no result."""

    def __init__(self, ctx: Context, make_teacher: Callable[[], Teacher] | None = None, make_stages: bool = True,
                 watch: Watch | None = None):
        self.ctx = ctx
        self._make_teacher = make_teacher or (lambda: get_teacher(ctx))
        self.make_stages = make_stages
        self._memo: dict = {}
        self.watch = watch

    def teacher(self) -> Teacher:
        return self.memo("teacher", self._make_teacher)

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def distill_seed(method_name: str, seed: int) -> int:
    """The seed of the distilled set a cell of seed `seed` uses: its own, or 0 for a method whose
    set does not depend on it (full data)."""
    return seed if method_uses_seed(load_method(method_name)) else 0


def distill_key(ctx: Context, method_name: str, teacher: str) -> str:
    """What a distilled set depends on besides method, IPC and seed: the teacher (its cache key
    covers the data, the splits and the recipe) and the method's own settings."""
    method = load_method(method_name)
    settings = recover_config(ctx.task, method).to_dict() if method.kind in ("recover", "noise") else method.strategy
    return artifacts.hash_config({"teacher": teacher, "method": method_name, "settings": settings})


def set_folder(ctx: Context, out: Path, method_name: str, ipc: int | None, seed: int) -> Path:
    """The folder of a suite's distilled set, shared by every cell (and every suite kind) that
    uses it: <out>/distilled/<method>-<ipc>-seed<seed>-<settings hash>."""
    config_hash = distill_key(ctx, method_name, teacher_key(ctx))[:10]
    return Path(out) / "distilled" / f"{method_name}-{'full' if ipc is None else f'ipc{ipc}'}-seed{seed}-{config_hash}"


def solo(ctx: Context) -> Context:
    """The context as this process alone (shares the loaded data, not the process group)."""
    return dataclasses.replace(ctx, group=ProcessGroup())


def deal_longest_first(jobs: list, ranks: int) -> list[list]:
    """Each rank's jobs: longest first (by `steps`) to the least-loaded rank, ties to the lowest
    rank, so no rank is left alone with a long job at the end. Deterministic: every rank computes
    the same deal from the same plan."""
    loads, shares = [0] * ranks, [[] for _ in range(ranks)]
    for job in sorted(jobs, key=lambda job: -job.steps):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(job)
        loads[rank] += job.steps
    return shares


def rank_records_path(out: Path, rank: int) -> Path:
    """Where rank `rank` of a multi-process suite writes its cells' records until rank 0 merges them."""
    return Path(out) / "ranks" / f"rank{rank}" / "records.jsonl"


def rank_record_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "ranks").glob("rank*/records.jsonl"))
