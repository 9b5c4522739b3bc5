"""The harness: run any suite. Its kind (harness/suites.py) makes the shared stages and one job
per cell; the harness skips the cells already recorded, runs the rest here or in worker
processes, appends one record per cell as it finishes, and returns the suite's records.

Under torchrun every rank runs `run_suite`: the kind's plan makes the shared stages collectively,
then the jobs are dealt longest first across the ranks, each rank running its own as a plain
single process. Ranks write their records to ranks/rank<r>/records.jsonl; rank 0 alone merges
them into records.jsonl (atomically, every cell once), at the end and, after a killed run, at
the start, so a resumed suite (with any number of ranks) skips every cell finished before.

Each finished cell's curve is stored beside the records (records.write_curve), and the progress
line estimates the time left from the cells' planned optimiser steps (Job.steps) and the rate
measured so far; under torchrun only rank 0 prints the estimate (of its own share of the cells,
dealt longest first, so about the suite's)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from cdabench import progress, records
from cdabench.config import load_task, with_holdout
from cdabench.distill.squeeze import get_teacher
from cdabench.engine.context import open_context
from cdabench.engine.runtime import worker_devices
from cdabench.engine.watch import Watch, check_loggers
from cdabench.harness.cells import Job, Session, deal_longest_first, rank_record_files, rank_records_path, solo
from cdabench.harness.suites import suite_kind
from cdabench.harness.workers import run_in_workers


def run_suite(suite, out: Path, data_root: str | None = None, device: str = "auto", cache: str | None = None,
              command: str = "", workers: int = 1, precision: str | None = None,
              holdout: tuple[int | None, float | None] = (None, None), watch: Watch | None = None) -> list[dict]:
    """Run every unfinished cell of `suite` (any kind); returns its records (old and new), in grid
    order. `workers`: cells run in that many worker processes (harness/workers.py), each with
    threads/workers threads. `holdout`: the command line's (--holdout-per-class, --holdout-fraction).
    `watch`: curve points and loggers (engine/watch.py); loggers write under `out`."""
    kind = suite_kind(suite)
    kind.validate(suite)
    watch = watch or Watch()
    check_loggers(watch.loggers)   # a missing logger package fails before any work
    if watch.log_dir is None:
        watch = dataclasses.replace(watch, log_dir=str(out))
    ctx = open_context(with_holdout(load_task(suite.task), *holdout), data_root, device, cache, precision)
    group = ctx.group
    out = Path(out)
    records_path = out / "records.jsonl"
    if group.is_main:  # records of a killed multi-process run that rank 0 had not merged yet
        records.merge_records(records_path, rank_record_files(out))
    group.barrier()
    done = _recorded(records_path)
    start = time.perf_counter()
    session = Session(solo(ctx), lambda: get_teacher(ctx), watch)  # the teacher: trained collectively under torchrun
    jobs = kind.plan(ctx, session, suite, out, command)
    todo, queued = [], set()
    for job in jobs:
        if job.key not in done and job.key not in queued:  # a repeated cell runs once
            queued.add(job.key)
            todo.append(job)
    if group.world > 1:
        mine, mine_path = deal_longest_first(todo, group.world)[group.rank], rank_records_path(out, group.rank)
    else:
        mine, mine_path = todo, records_path
    apart = (workers > 1 and len(mine) > 1) or (group.world > 1 and kind.plain_process and bool(mine))
    label = f"suite {suite.name}" + (f" (rank {group.rank})" if group.world > 1 else "")
    remaining = progress.Remaining(sum(job.steps for job in mine))
    with progress.track(label, len(mine) if group.world > 1 else len(jobs)) as bar:
        if group.world == 1:
            bar.advance(len(jobs) - len(mine), "already recorded")
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
        done = _recorded(records_path)
    progress.log(f"suite {suite.name}: {len(jobs)} cells in {time.perf_counter() - start:.0f}s -> {records_path}")
    return [done[job.key] for job in jobs]


def _recorded(path: Path) -> dict[str, dict]:
    """The records already in `path`, by cell key."""
    return {r.get("cell_key"): r for r in records.read_records(path)} if path.exists() else {}


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
