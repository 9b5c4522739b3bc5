"""The cross-architecture suite kind: a declared grid of task x method x IPC x student x label
protocol x seed. Its shared stages are one teacher per task and one distilled set per method, IPC
and seed, reused by every student; each cell post-trains one student on one set
(evaluate.posttrain.evaluate). The harness (harness/run.py) runs the cells."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import timm

from cdabench import artifacts
from cdabench.config import ConfigError, load_method, load_task, split_settings
from cdabench.distill.sets import distill
from cdabench.engine.context import Context
from cdabench.engine.models import MODELS
from cdabench.evaluate.posttrain import evaluate, evaluation_config
from cdabench.harness.cells import Job, Session, distill_seed, set_folder
from cdabench.schema import Suite

NAME = "cross-arch"


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


def narrow(suite: Suite, task: str | None = None, ipcs=None, students=None, seeds=None, methods=None,
           steps=None, strategies=None) -> Suite:
    """The command line's overrides of a suite's grid."""
    if steps or strategies:
        raise ConfigError("--steps and --strategies apply to continual suites only (e.g. --suite continual)")
    changes = {k: tuple(v) for k, v in
               {"ipcs": ipcs, "students": students, "seeds": seeds, "methods": methods}.items() if v}
    if task:
        changes["task"] = task
    return dataclasses.replace(suite, **changes)


def validate(suite: Suite) -> None:
    """Unknown names fail before any work starts, listing the valid ones."""
    task = load_task(suite.task)
    for method in suite.methods + suite.hard_label_methods:
        load_method(method)
    unknown = [s for s in suite.students or task.panel if s not in MODELS and not timm.is_model(s)]
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
                for student in suite.students or task.panel:
                    labels = list(suite.labels)
                    if method_name in suite.hard_label_methods and "hard" not in labels:
                        labels.append("hard")
                    cells.extend(Cell(task.name, method_name, ipc, student, lab, seed) for lab in labels)
    return cells


def cell_key(cell: Cell, images_hash: str, eval_config: dict, teacher_hash: str | None, split: dict) -> str:
    """What a cell's result depends on: change any of it and the cell runs again. `split`: the
    task's held-out split (split_settings); the full set's images hash does not cover it."""
    return artifacts.hash_config({"cell": dataclasses.asdict(cell), "images": images_hash, "split": split,
                                  "eval": eval_config, "teacher": teacher_hash if cell.labels == "soft" else None})


def plan(ctx: Context, session: Session, suite: Suite, out: Path, command: str) -> list[Job]:
    """The shared stages, then one job per cell. Under torchrun every rank runs this: the teacher
    is trained data-parallel, the recover shards of each synthetic set are dealt across the ranks,
    and the selection baselines' sets are dealt whole (they need no collective work)."""
    group = ctx.group
    teacher = session.teacher()
    cells = expand(suite)
    sets = {}
    for cell in cells:
        set_key = (cell.method, cell.ipc, distill_seed(cell.method, cell.seed))
        if set_key not in sets:
            sets[set_key] = set_folder(ctx, out, *set_key)
    selected = [k for k in sets if load_method(k[0]).kind == "select"]
    for i, set_key in enumerate(selected):
        if i % group.world == group.rank:
            distill(session.ctx, *set_key, sets[set_key], command=command, teacher=teacher)
    group.barrier()
    manifests = {}
    for set_key, folder in sets.items():  # recover: every rank takes its shards; the rest: read back
        stage = session.ctx if set_key in selected else ctx
        manifests[set_key] = distill(stage, *set_key, folder, command=command, teacher=teacher)
    jobs = []
    for cell in cells:
        set_key = (cell.method, cell.ipc, distill_seed(cell.method, cell.seed))
        manifest = manifests[set_key]
        full = bool(manifest.get("full"))
        images = len(ctx.fit) if full else len(manifest["files"])  # full: the fit split, no copies
        eval_config = evaluation_config(ctx, cell.student, cell.labels, full=full, images=images)
        key = cell_key(cell, manifest["images_hash"], eval_config, teacher.hash, split_settings(ctx.task))
        steps = eval_config["recipe"]["epochs"] * math.ceil(images / eval_config["recipe"]["batch_size"])
        jobs.append(Job(key, cell.name, steps, evaluate_cell,
                        {"folder": str(sets[set_key]), "student": cell.student, "labels": cell.labels,
                         "seed": cell.seed, "command": command}))
    return jobs


def evaluate_cell(session: Session, folder: str, student: str, labels: str, seed: int, command: str) -> dict:
    """One cell: a fresh student post-trained on the set in `folder`; its record."""
    return evaluate(session.ctx, folder, student, labels, seed, command=command, teacher=session.teacher())


def summary(record: dict) -> str:
    """The progress line of a finished cell."""
    return f"top-1 {record['top1']:.2f}% ({record['seconds']['posttrain']:.1f}s)"
