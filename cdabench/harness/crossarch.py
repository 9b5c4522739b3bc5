"""The cross-architecture suite kind: a declared grid of task x method x IPC x student x label
protocol x seed. Its shared stages are one teacher per task and one distilled set per method, IPC
and seed, reused by every student; each cell post-trains one student on one set
(evaluate.posttrain.evaluate). The harness (harness/run.py) runs the cells.

Two opt-in settings add cells for what the images add beside the labels and the augmentation
(docs/suites.md): `hard_label_methods` (with `full`: the hard-label recovery) and
`no_augment_methods` (the student's augmentation off: the augmentation share)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import timm

from cdabench import artifacts
from cdabench.config import ConfigError, load_method, load_task, split_settings
from cdabench.distill.sets import distill, load_external
from cdabench.engine.context import Context
from cdabench.engine.models import MODELS
from cdabench.evaluate.posttrain import LABEL_PROTOCOLS, cell_name, evaluate, evaluation_config
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
    augment: bool = True      # False: the student's augmentation off (`no_augment_methods`)

    @property
    def name(self) -> str:
        return cell_name(self.method, self.ipc, self.student, self.labels, self.seed, self.augment)


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
    for method in suite.methods + suite.hard_label_methods + suite.no_augment_methods:
        load_method(method)
    if suite.no_augment_methods and "random" not in suite.no_augment_methods:
        raise ConfigError(f"no_augment_methods = {list(suite.no_augment_methods)} needs random too: the Δ vs random "
                          "with the augmentation off compares each method with random real images under the same "
                          "protocol (add \"random\")")
    unknown = [s for s in suite.students or task.panel if s not in MODELS and not timm.is_model(s)]
    if unknown:
        raise ConfigError(f"unknown student(s) {', '.join(unknown)}: use {', '.join(sorted(MODELS))} or a timm model name")
    bad = [label for label in suite.labels if label not in LABEL_PROTOCOLS]
    if bad:
        raise ConfigError(f"unknown label protocol(s) {', '.join(bad)}: use {', '.join(LABEL_PROTOCOLS)}")
    for name in suite.methods:
        method = load_method(name)
        if method.kind == "external" and method.source.ipc is None:
            raise ConfigError(f"external method {name}: name its images per class in the entry ([source] ipc = N), "
                              "so that the suite can place it beside the other methods' cells")


def expand(suite: Suite) -> list[Cell]:
    """The grid, in run order: method, IPC, seed, student, label protocol (then the suite's label
    protocols again with the augmentation off, for `no_augment_methods`)."""
    task = load_task(suite.task)
    ipcs = suite.ipcs or task.ipcs
    cells = []
    for method_name in suite.methods:
        method = load_method(method_name)
        full = method.kind == "select" and method.strategy == "full"
        external = method.kind == "external"
        for ipc in ([None] if full else [method.source.ipc] if external else ipcs):
            for seed in suite.seeds:
                for student in suite.students or task.panel:
                    labels = [lab for lab in suite.labels if external or lab != "method"]
                    if method_name in suite.hard_label_methods and "hard" not in labels:
                        labels.append("hard")
                    if external and "method" not in labels:   # its own labels beside our relabel
                        labels.append("method")
                    cells.extend(Cell(task.name, method_name, ipc, student, lab, seed) for lab in labels)
                    if method_name in suite.no_augment_methods:
                        cells.extend(Cell(task.name, method_name, ipc, student, lab, seed, augment=False)
                                     for lab in suite.labels)
    return cells


def cell_key(cell: Cell, images_hash: str, eval_config: dict, teacher_hash: str | None, split: dict) -> str:
    """What a cell's result depends on: change any of it and the cell runs again. `split`: the
    task's held-out split (split_settings); the full set's images hash does not cover it. A cell
    with the augmentation on keeps the key it had before `augment` existed (finished runs resume)."""
    described = dataclasses.asdict(cell)
    if cell.augment:
        del described["augment"]
    return artifacts.hash_config({"cell": described, "images": images_hash, "split": split,
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
        if set_key not in sets:   # an external set is read where it is; ours are made under `out`
            external = load_method(cell.method).kind == "external"
            sets[set_key] = None if external else set_folder(ctx, out, *set_key)
    selected = [k for k in sets if load_method(k[0]).kind == "select"]
    for i, set_key in enumerate(selected):
        if i % group.world == group.rank:
            distill(session.ctx, *set_key, sets[set_key], command=command, teacher=teacher, make=session.make_stages)
    group.barrier()
    manifests = {}
    for set_key, folder in sets.items():  # recover: every rank takes its shards; the rest: read back
        if folder is None:   # checked (format, space, classes, IPC) before any cell trains
            manifests[set_key] = load_external(ctx, load_method(set_key[0])).manifest
            continue
        stage = session.ctx if set_key in selected else ctx
        manifests[set_key] = distill(stage, *set_key, folder, command=command, teacher=teacher,
                                     make=session.make_stages)
    jobs = []
    for cell in cells:
        set_key = (cell.method, cell.ipc, distill_seed(cell.method, cell.seed))
        manifest = manifests[set_key]
        full = bool(manifest.get("full"))
        # full: the fit split, no copies; an external set: its image count (its files may be tensor files)
        images = len(ctx.fit) if full else manifest.get("num_images") or len(manifest["files"])
        eval_config = evaluation_config(ctx, cell.student, cell.labels, full=full, images=images,
                                        source=manifest.get("source"), augment=cell.augment)
        key = cell_key(cell, manifest["images_hash"], eval_config, teacher.hash, split_settings(ctx.task))
        steps = eval_config["recipe"]["epochs"] * math.ceil(images / eval_config["recipe"]["batch_size"])
        folder = sets[set_key]
        jobs.append(Job(key, cell.name, steps, evaluate_cell,
                        {"folder": None if folder is None else str(folder), "student": cell.student,
                         "labels": cell.labels, "seed": cell.seed, "command": command,
                         "external": cell.method if folder is None else None, "augment": cell.augment},
                        student=cell.student))
    return jobs


def evaluate_cell(session: Session, folder: str | None, student: str, labels: str, seed: int, command: str,
                  external: str | None = None, augment: bool = True) -> dict:
    """One cell: a fresh student post-trained on the set in `folder` (or the external method
    entry `external` names); its record."""
    method = load_method(external) if external else None
    return evaluate(session.ctx, folder, student, labels, seed, command=command, teacher=session.teacher(),
                    method=method, augment=augment, watch=session.watch)


def summary(record: dict) -> str:
    """The progress line of a finished cell."""
    return f"top-1 {record['top1']:.2f}% ({record['seconds']['posttrain']:.1f}s)"
