"""Suites: a declared grid of task x method x IPC x student x label protocol x seed, run with
every distinct stage computed once (one teacher per task, one distilled set per method, IPC and
seed, reused by every student) and every finished cell skipped on a re-run."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from cdabench import artifacts, packaged, progress, records
from cdabench.cellpool import evaluate_cells
from cdabench.config import (ConfigError, load_method, load_named, load_task, method_uses_seed, recover_config,
                             split_settings, with_holdout)
from cdabench.distill.context import open_context
from cdabench.distill.pipeline import distill, evaluate, evaluation_config
from cdabench.distill.squeeze import get_teacher, teacher_key
from cdabench.models import MODELS
from cdabench.schema import Suite


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    ipc: int | None
    student: str
    labels: str
    seed: int

    @property
    def name(self) -> str:
        ipc = "full" if self.ipc is None else f"ipc{self.ipc}"
        return f"{self.method}/{ipc}/{self.student}/{self.labels}/seed{self.seed}"


def list_suites() -> list[str]:
    return packaged.names("suites")


def load_suite(name: str) -> Suite:
    return load_named("suites", Suite, name)


def narrow(suite: Suite, task: str | None = None, ipcs=None, students=None, seeds=None, methods=None) -> Suite:
    """The command line's overrides of a suite's grid."""
    changes = {k: tuple(v) for k, v in
               {"ipcs": ipcs, "students": students, "seeds": seeds, "methods": methods}.items() if v}
    if task:
        changes["task"] = task
    return dataclasses.replace(suite, **changes)


def validate(suite: Suite) -> None:
    """Unknown names fail before any work starts, listing the valid ones."""
    load_task(suite.task)
    for method in suite.methods + suite.hard_label_methods:
        load_method(method)
    unknown = [s for s in suite.students if s not in MODELS and not timm.is_model(s)]
    if unknown:
        raise ConfigError(f"unknown student(s) {', '.join(unknown)}: use {', '.join(sorted(MODELS))} or a timm model name")
    bad = [label for label in suite.labels if label not in ("soft", "hard")]
    if bad:
        raise ConfigError(f"unknown label protocol(s) {', '.join(bad)}: use soft or hard")


def expand(suite: Suite) -> list[Cell]:
    """The grid, in run order: method, IPC, seed, student, label protocol."""
    task = load_task(suite.task)
    ipcs = suite.ipcs or task.ipcs
    cells = []
    for method_name in suite.methods:
        method = load_method(method_name)
        full = method.kind == "select" and method.strategy == "full"
        for ipc in ([None] if full else ipcs):
            for seed in suite.seeds:
                for student in suite.students:
                    labels = list(suite.labels)
                    if method_name in suite.hard_label_methods and "hard" not in labels:
                        labels.append("hard")
                    cells.extend(Cell(task.name, method_name, ipc, student, lab, seed) for lab in labels)
    return cells


def distill_seed(method_name: str, seed: int) -> int:
    return seed if method_uses_seed(load_method(method_name)) else 0


def distill_key(ctx, method_name: str, teacher: str) -> str:
    """What a distilled set depends on besides method, IPC and seed: the teacher (its cache key
    covers the data, the splits and the recipe) and the method's own settings."""
    method = load_method(method_name)
    settings = recover_config(ctx.task, method).to_dict() if method.kind in ("recover", "noise") else method.strategy
    return artifacts.hash_config({"teacher": teacher, "method": method_name, "settings": settings})


def cell_key(cell: Cell, images_hash: str, eval_config: dict, teacher_hash: str | None, split: dict) -> str:
    """What a cell's result depends on: change any of it and the cell runs again. `split`: the
    task's held-out split (split_settings); the full set's images hash does not cover it."""
    return artifacts.hash_config({"cell": dataclasses.asdict(cell), "images": images_hash, "split": split,
                                  "eval": eval_config, "teacher": teacher_hash if cell.labels == "soft" else None})


def run_suite(suite: Suite, out: Path, data_root: str | None = None, device: str = "auto",
              cache: str | None = None, command: str = "", stop_after: int | None = None,
              workers: int = 1, precision: str | None = None,
              holdout: tuple[int | None, float | None] = (None, None)) -> list[dict]:
    """Run every unfinished cell; returns the suite's records (old and new). The shared stages
    (teacher, every distilled set) run first in this process; then the post-train cells, here
    or in `workers` single-thread processes (cdabench/cellpool.py). `holdout`: the command line's
    (--holdout-per-class, --holdout-fraction). `stop_after` stops after
    that many newly evaluated cells (tests of resuming)."""
    validate(suite)
    cells = expand(suite)
    task = with_holdout(load_task(suite.task), *holdout)
    ctx = open_context(task, data_root, device, cache, precision)
    out = Path(out)
    records_path = out / "records.jsonl"
    existing = records.read_records(records_path) if records_path.exists() else []
    done = {r.get("cell_key"): r for r in existing}
    start = time.perf_counter()
    teacher = get_teacher(ctx)
    distilled, plan = {}, []
    for cell in cells:
        dseed = distill_seed(cell.method, cell.seed)
        set_key = (cell.method, cell.ipc, dseed)
        if set_key not in distilled:
            config_hash = distill_key(ctx, cell.method, teacher_key(ctx, 0))[:10]
            folder = out / "distilled" / f"{cell.method}-{'full' if cell.ipc is None else f'ipc{cell.ipc}'}" \
                f"-seed{dseed}-{config_hash}"
            distilled[set_key] = (folder, distill(ctx, cell.method, cell.ipc, dseed, folder, command=command,
                                                       teacher=teacher))
        folder, manifest = distilled[set_key]
        full = bool(manifest.get("full"))
        eval_config = evaluation_config(ctx, cell.student, cell.labels, full=full)
        key = cell_key(cell, manifest["images_hash"], eval_config, teacher.hash, split_settings(task))
        images = len(ctx.fit) if full else len(manifest["files"])  # full: the fit split, no copies
        steps = eval_config["recipe"]["epochs"] * math.ceil(images / eval_config["recipe"]["batch_size"])
        plan.append((cell, folder, key, steps))
    jobs, queued = [], set()
    for cell, folder, key, steps in plan:
        if key in done or key in queued:  # a repeated cell runs once
            continue
        queued.add(key)
        jobs.append({"folder": str(folder), "student": cell.student, "labels": cell.labels, "seed": cell.seed,
                     "command": command, "extra": {"suite": suite.name, "cell": cell.name, "cell_key": key},
                     "steps": steps})
    if stop_after is not None:
        jobs = jobs[:stop_after]
    with progress.track(f"suite {suite.name}", len(cells)) as bar:
        bar.advance(len(cells) - len(jobs), "already recorded")
        if workers > 1 and len(jobs) > 1:
            threads = max(1, torch.get_num_threads() // workers)
            # Longest first (by optimiser steps), so no worker is left alone with a long cell at the end.
            jobs = sorted(jobs, key=lambda job: -job["steps"])
            for job, record in evaluate_cells(jobs, workers, threads, task, data_root, device,
                                              cache, out / "cells", ctx.precision):
                done[job["extra"]["cell_key"]] = records.append_record(records_path, record)
                progress.log(f"{job['extra']['cell']}: top-1 {record['top1']:.2f}% "
                             f"({record['seconds']['posttrain']:.1f}s)")
                bar.advance(1, job["extra"]["cell"])
        else:
            for job in jobs:
                done[job["extra"]["cell_key"]] = evaluate(
                    ctx, job["folder"], job["student"], job["labels"], job["seed"], out, command=command,
                    teacher=teacher, extra=job["extra"])
                bar.advance(1, job["extra"]["cell"])
    if stop_after is not None and len(jobs) == stop_after and any(p[2] not in done for p in plan):
        raise KeyboardInterrupt(f"stopped after {stop_after} cell(s) as asked")
    progress.log(f"suite {suite.name}: {len(cells)} cells in {time.perf_counter() - start:.0f}s -> {records_path}")
    return [done[p[2]] for p in plan]
