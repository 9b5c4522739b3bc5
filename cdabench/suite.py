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
from cdabench.runtime import ProcessGroup, worker_devices
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


def deal_longest_first(jobs: list[dict], ranks: int) -> list[list[dict]]:
    """Each rank's cells: longest first (by optimiser steps) to the least-loaded rank, ties to the
    lowest rank, so no rank is left alone with a long cell at the end. Deterministic: every rank
    computes the same deal from the same plan."""
    loads, shares = [0] * ranks, [[] for _ in range(ranks)]
    for job in sorted(jobs, key=lambda job: -job["steps"]):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(job)
        loads[rank] += job["steps"]
    return shares


def rank_records_path(out: Path, rank: int) -> Path:
    """Where rank `rank` of a multi-process suite writes its cells' records until rank 0 merges them."""
    return Path(out) / "ranks" / f"rank{rank}" / "records.jsonl"


def rank_record_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "ranks").glob("rank*/records.jsonl"))


def run_suite(suite: Suite, out: Path, data_root: str | None = None, device: str = "auto",
              cache: str | None = None, command: str = "", workers: int = 1, precision: str | None = None,
              holdout: tuple[int | None, float | None] = (None, None)) -> list[dict]:
    """Run every unfinished cell; returns the suite's records (old and new). The shared stages
    (teacher, every distilled set) run first; then the post-train cells, here or in `workers`
    processes (cdabench/cellpool.py). `holdout`: the command line's (--holdout-per-class,
    --holdout-fraction).

    Under torchrun every rank runs this function: the teacher is trained data-parallel, the recover shards
    of each synthetic set are dealt across the ranks, the selection baselines' sets are dealt
    whole, and then the cells are dealt longest first (`deal_longest_first`), each rank
    evaluating its own on its device as a plain single process. Ranks write their records to
    ranks/rank<r>/records.jsonl; rank 0 alone merges them into records.jsonl (atomically, every
    cell once), at the end and, after a killed run, at the start, so a resumed suite (with any
    number of ranks) skips every cell finished before."""
    validate(suite)
    cells = expand(suite)
    task = with_holdout(load_task(suite.task), *holdout)
    ctx = open_context(task, data_root, device, cache, precision)
    group = ctx.group
    solo = dataclasses.replace(ctx, group=ProcessGroup())  # this process alone (shares the loaded data)
    out = Path(out)
    records_path = out / "records.jsonl"
    if group.is_main:  # records of a killed multi-process run that rank 0 had not merged yet
        records.merge_records(records_path, rank_record_files(out))
    group.barrier()
    existing = records.read_records(records_path) if records_path.exists() else []
    done = {r.get("cell_key"): r for r in existing}
    start = time.perf_counter()
    teacher = get_teacher(ctx)
    sets = {}
    for cell in cells:
        dseed = distill_seed(cell.method, cell.seed)
        set_key = (cell.method, cell.ipc, dseed)
        if set_key not in sets:
            config_hash = distill_key(ctx, cell.method, teacher_key(ctx, 0))[:10]
            sets[set_key] = out / "distilled" / f"{cell.method}-{'full' if cell.ipc is None else f'ipc{cell.ipc}'}" \
                f"-seed{dseed}-{config_hash}"
    # Selection baselines need no collective work: each rank makes its share of the sets alone.
    selected = [k for k in sets if load_method(k[0]).kind == "select"]
    for i, set_key in enumerate(selected):
        if i % group.world == group.rank:
            distill(solo, set_key[0], set_key[1], set_key[2], sets[set_key], command=command, teacher=teacher)
    group.barrier()
    distilled = {}
    for set_key, folder in sets.items():  # recover: every rank takes its shards; the rest: read back
        stage = solo if set_key in selected else ctx
        distilled[set_key] = (folder, distill(stage, set_key[0], set_key[1], set_key[2], folder, command=command,
                                              teacher=teacher))
    plan = []
    for cell in cells:
        folder, manifest = distilled[(cell.method, cell.ipc, distill_seed(cell.method, cell.seed))]
        full = bool(manifest.get("full"))
        images = len(ctx.fit) if full else len(manifest["files"])  # full: the fit split, no copies
        eval_config = evaluation_config(ctx, cell.student, cell.labels, full=full, images=images)
        key = cell_key(cell, manifest["images_hash"], eval_config, teacher.hash, split_settings(task))
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
    if group.world > 1:
        mine = deal_longest_first(jobs, group.world)[group.rank]
        mine_path = rank_records_path(out, group.rank)
    else:
        mine, mine_path = jobs, records_path
    label = f"suite {suite.name}" + (f" (rank {group.rank})" if group.world > 1 else "")
    with progress.track(label, len(mine) if group.world > 1 else len(cells)) as bar:
        if group.world == 1:
            bar.advance(len(cells) - len(mine), "already recorded")
        if workers > 1 and len(mine) > 1:
            threads = max(1, torch.get_num_threads() // workers)
            # Longest first (by optimiser steps), so no worker is left alone with a long cell at the end.
            mine = sorted(mine, key=lambda job: -job["steps"])
            for job, record in evaluate_cells(mine, worker_devices(ctx.device, workers, group.world), threads,
                                              ctx.task, data_root, cache):
                done[job["extra"]["cell_key"]] = records.append_record(mine_path, record)
                progress.log(f"{job['extra']['cell']}: top-1 {record['top1']:.2f}% "
                             f"({record['seconds']['posttrain']:.1f}s)")
                bar.advance(1, job["extra"]["cell"])
        else:
            for job in mine:
                record = evaluate(solo, job["folder"], job["student"], job["labels"], job["seed"], command=command,
                                  teacher=teacher, extra=job["extra"])
                done[job["extra"]["cell_key"]] = records.append_record(mine_path, record)
                bar.advance(1, job["extra"]["cell"])
    if group.world > 1:
        group.barrier()
        if group.is_main:
            records.merge_records(records_path, rank_record_files(out), order=[p[2] for p in plan])
        group.barrier()
        done = {r.get("cell_key"): r for r in records.read_records(records_path)} if records_path.exists() else {}
    progress.log(f"suite {suite.name}: {len(cells)} cells in {time.perf_counter() - start:.0f}s -> {records_path}")
    return [done[p[2]] for p in plan]
