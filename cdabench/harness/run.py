"""The harness: run any suite. Its kind (harness/suites.py) makes the shared stages and one job
per cell; the harness skips the cells already recorded, runs the rest here or in worker
processes, appends one record per cell as it finishes, and returns the suite's records.

Under torchrun every rank runs `run_suite`: the kind's plan makes the shared stages collectively,
then the jobs are dealt longest first across the ranks, each rank running its own as a plain
single process. Ranks write their records to ranks/rank<r>/records.jsonl; rank 0 alone merges
them into records.jsonl (atomically, every cell once), at the end and, after a killed run, at
the start, so a resumed suite (with any number of ranks) skips every cell finished before.

As independent jobs (a Slurm job array) `--stages shared` makes the teacher and every distilled
set once, then each `--shard I/N` runs the cells dealt to it (harness/shards.py has the rule),
making no shared stage, into shards/shard<I>of<N>/records.jsonl; a later plain run merges those
files as it merges the ranks'. Every run holds a lock on its folder (harness/lock.py).

Each finished cell's curve is stored beside the records (records.write_curve), and the progress
line estimates the time left from the cells' planned optimiser steps (Job.steps) and the rate
measured so far; under torchrun only rank 0 prints the estimate (of its own share of the cells,
dealt longest first, so about the suite's)."""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from cdabench import progress, records
from cdabench.config import ConfigError, load_task, with_holdout
from cdabench.distill.squeeze import StageMissing, get_teacher
from cdabench.engine.context import open_context
from cdabench.engine.runtime import device_description, launched_rank, launched_world, worker_devices
from cdabench.engine.watch import Watch, check_loggers
from cdabench.harness.cells import Job, Session, deal_longest_first, rank_record_files, rank_records_path, solo
from cdabench.harness.lock import FolderLock
from cdabench.harness.shards import (Shard, prune_shard_folders, shard_jobs, shard_record_files, shard_records_path,
                                     stages_command)
from cdabench.harness.suites import suite_kind
from cdabench.harness.workers import run_in_workers

STAGES = ("all", "shared")


def run_suite(suite, out: Path, data_root: str | None = None, device: str = "auto", cache: str | None = None,
              command: str = "", workers: int = 1, precision: str | None = None,
              holdout: tuple[int | None, float | None] = (None, None), shard: Shard | None = None,
              stages: str = "all", watch: Watch | None = None, remeasure: bool = False) -> list[dict]:
    """Run every unfinished cell of `suite` (any kind); returns its records (old and new), in grid
    order. `workers`: cells run in that many worker processes (harness/workers.py), each with
    threads/workers threads. `holdout`: the command line's (--holdout-per-class, --holdout-fraction).
    `stages`: "all", or "shared": make the teacher and every distilled set, run no cell, return [].
    `shard`: run only the cells dealt to that shard (returns their records), reading the shared
    stages back (StageMissing, naming the command that makes them, when one is missing).
    `watch`: curve points and loggers (engine/watch.py); loggers write under `out`.
    `remeasure`: run the cells the folder holds by name with another key (an edited task run again);
    without it such a folder stops the run before any cell (_refuse_other_measurements)."""
    kind = suite_kind(suite)
    kind.validate(suite)
    if stages not in STAGES:
        raise ConfigError(f"unknown stages {stages!r}: use {' or '.join(STAGES)}")
    if shard is not None and stages != "all":
        raise ConfigError("--stages shared makes every shared stage in one job (under torchrun, split across its "
                          "ranks): it takes no --shard")
    if shard is not None and launched_world() > 1:
        raise ConfigError("--shard runs as one plain process, not under torchrun: give the shard's job its GPUs "
                          "and --workers N (one cell per GPU at a time)")
    watch = watch or Watch()
    check_loggers(watch.loggers)   # a missing logger package fails before any work
    if watch.log_dir is None:
        watch = dataclasses.replace(watch, log_dir=str(out))
    out = Path(out)
    with FolderLock(out, command, shard) if launched_rank() == 0 else nullcontext():  # rank 0 speaks for torchrun
        return _run(kind, suite, out, data_root, device, cache, command, workers, precision, holdout, shard, stages,
                    watch, remeasure)


def _run(kind, suite, out: Path, data_root, device, cache, command, workers, precision, holdout,
         shard: Shard | None, stages: str, watch: Watch, remeasure: bool) -> list[dict]:
    ctx = open_context(with_holdout(load_task(suite.task), *holdout), data_root, device, cache, precision)
    group = ctx.group
    records_path = out / "records.jsonl"
    if shard is None and group.is_main:  # records of a killed multi-process run, or of shards, not merged yet
        records.merge_records(records_path, rank_record_files(out) + shard_record_files(out))
        prune_shard_folders(out)
    group.barrier()
    start = time.perf_counter()
    make = shard is None  # a shard makes no shared stage: every shard would train its own teacher
    session = Session(solo(ctx), lambda: get_teacher(ctx, train=make), make_stages=make,  # collective under torchrun
                      watch=watch)
    try:
        jobs = kind.plan(ctx, session, suite, out, command)
    except StageMissing as exc:
        if make:
            raise
        raise StageMissing(f"shard {shard} of suite {suite.name} makes no shared stage, and {exc}: make them first "
                           f"with `{stages_command(command, suite.name, out)}` (same --out and --cache-dir)") from exc
    if stages == "shared":
        progress.log(f"suite {suite.name}: shared stages ready ({time.perf_counter() - start:.0f}s); now its cells: "
                     "`cdabench run` with the same options, or an array of `--shard I/N`")
        return []
    unique, queued = [], set()
    for job in jobs:
        if job.key not in queued:  # a repeated cell runs once
            queued.add(job.key)
            unique.append(job)
    cells, mine_path = jobs, records_path
    if shard is not None:
        own = shard_record_files(out, shard.count)
        others = [records_path, *rank_record_files(out), *(p for p in shard_record_files(out) if p not in own)]
        settled, done = _recorded(others), _recorded(others + own)
        cells, mine = shard_jobs(unique, shard, set(settled), set(done))
        mine_path = shard_records_path(out, shard)
    else:
        done = _recorded([records_path])
        mine = [job for job in unique if job.key not in done]
        if group.world > 1:
            mine, mine_path = deal_longest_first(mine, group.world)[group.rank], rank_records_path(out, group.rank)
    if not remeasure:
        _refuse_other_measurements(unique, done, ctx, records_path)
    apart = (workers > 1 and len(mine) > 1) or (group.world > 1 and kind.plain_process and bool(mine))
    label = f"suite {suite.name}" + (f" (rank {group.rank})" if group.world > 1 else "") + \
        (f" (shard {shard})" if shard else "")
    remaining = progress.Remaining(sum(job.steps for job in mine))
    with progress.track(label, len(mine) if group.world > 1 else len(cells)) as bar:
        if group.world == 1:
            bar.advance(len(cells) - len(mine), "already recorded")
        for job, record in _run_jobs(mine, session, apart, workers, group.world, data_root, cache):
            record = records.write_curve(out, job.key, dict(record, suite=suite.name, cell=job.name, cell_key=job.key))
            done[job.key] = records.append_record(mine_path, record)
            remaining.advance(job.steps)
            progress.log(f"{job.name}: {kind.summary(record)}")
            bar.advance(1, f"{job.name}, {remaining}" if group.is_main else job.name)
    if group.world > 1:
        group.barrier()
        if group.is_main:
            records.merge_records(records_path, rank_record_files(out), order=[job.key for job in jobs])
        group.barrier()
        done = _recorded([records_path])
    what = f" shard {shard}: {len(cells)} of {len(unique)}" if shard else f": {len(jobs)}"
    progress.log(f"suite {suite.name}{what} cells in {time.perf_counter() - start:.0f}s -> {mine_path}")
    return [done[job.key] for job in cells]


def _recorded(paths: list[Path]) -> dict[str, dict]:
    """The records in the files `paths` (those that exist), by cell key; the first of a repeated cell.
    Every key counts as done, a superseded measurement's too: a cell is never run twice."""
    done: dict[str, dict] = {}
    for r in (r for path in paths if path.exists() for r in records.read_records(path)):
        done.setdefault(r.get("cell_key"), r)
    return done


def _refuse_other_measurements(jobs: list[Job], done: dict[str, dict], ctx, records_path: Path) -> None:
    """Stop before a cell runs when the folder already holds one of these cells by name with another
    key: made from another teacher, set or recipe (another machine's float path, an edited task).
    Run on, the folder would hold two measurements of one cell unasked (tables count the later)."""
    recorded = {records.cell_identity(r): r for r in done.values() if r.get("cell") is not None}
    clashes = []
    for job in jobs:
        other = recorded.get((ctx.task.name, job.student, job.name))
        if other is not None and job.key not in done:
            clashes.append((job, other))
    if not clashes:
        return
    job, r = clashes[0]
    raise records.RecordError(
        f"{records_path} holds {len(clashes)} of these cells measured otherwise, e.g. {job.name}: recorded with key "
        f"{str(r.get('cell_key'))[:12]} on {r.get('device')} by `{r.get('command')}`, here key {job.key[:12]} on "
        f"{device_description(ctx.device)}. Another teacher, distilled set or recipe makes another key: another "
        "machine's float path (its CPU's instruction set, a GPU, the thread count), an edited task or another "
        "cdabench version. Write this run to another --out (one folder per machine or variant), or pass --remeasure "
        "to measure them again here (tables then count each cell's latest record)")


def _run_jobs(jobs: list[Job], session: Session, apart: bool, workers: int, world: int, data_root: str | None,
              cache: str | None):
    """(job, record) as each finishes: here, one after another, or in worker processes, longest
    first (by optimiser steps) so no worker is left alone with a long cell at the end."""
    if not apart:
        for job in jobs:
            yield job, job.run(session, **job.args)
        return
    ctx = session.ctx
    workers = max(1, workers)
    devices = worker_devices(ctx.device, workers, world)
    threads = max(1, torch.get_num_threads() // workers)
    yield from run_in_workers(sorted(jobs, key=lambda job: -job.steps), devices, threads, ctx.task, data_root, cache,
                              session.watch)
