"""Squeeze: the teacher. Trained with the task's recipe on the fit split (cached by a content
hash of everything that determines it), or loaded from a user's checkpoint (or the task's own,
`teacher_checkpoint`) and checked against the dataset: class count, class map, and a class-order
guard on held-out real images."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdabench import artifacts, packaged, progress
from cdabench.data import DataError
from cdabench.engine.context import Context
from cdabench.engine.labels import HardLabels
from cdabench.engine.runtime import prepare_model, seed_everything
from cdabench.engine.train import ImageBank, evaluate_model, train_model


class StageMissing(FileNotFoundError):
    """A stage that this process may only read (a shard of a suite makes no shared stage) is not
    on disk: its message names what is missing and where it was looked for."""


@dataclass
class Teacher:
    model: nn.Module
    hash: str              # sha256 of the checkpoint file
    info: dict             # recipe, accuracies, seconds, source


def teacher_key(ctx: Context) -> str:
    return artifacts.hash_config({
        "stage": "squeeze", "dataset": ctx.data.fingerprint(), "task_split": [
            ctx.task.holdout_fraction, ctx.task.holdout_per_class, ctx.task.split_seed],
        "recipe": dataclasses.asdict(ctx.task.teacher), "precision": ctx.precision,
        "seed": ctx.task.teacher_seed})


def _new_teacher(ctx: Context) -> nn.Module:
    return ctx.new_model(ctx.task.teacher)


def train_teacher(ctx: Context, train: bool = True) -> Teacher:
    """Train (or reuse) the task's teacher, seeded with the task's `teacher_seed`. Under torchrun
    every rank trains it data-parallel (train_model with the context's group); rank 0 evaluates and
    saves it, the others then load it.
    `train=False`: reuse only; StageMissing when the cache does not hold it."""
    key, seed = teacher_key(ctx), ctx.task.teacher_seed
    folder = ctx.cache / "teachers" / key
    weights, meta_path = folder / "teacher.pt", folder / "teacher.json"
    if not train and not meta_path.exists():
        raise StageMissing(f"the teacher of task {ctx.task.name} is not in the cache {ctx.cache} "
                           f"(looked for {meta_path})")
    if ctx.group.broadcast(not meta_path.exists()):  # rank 0's view: every rank trains, or none
        recipe = ctx.task.teacher
        seed_everything(seed)
        model = prepare_model(_new_teacher(ctx), ctx.device)
        labels = HardLabels(recipe.augment, ctx.image_size)
        start = time.perf_counter()
        result = train_model(model, ctx.source("fit"), labels, recipe, ctx.normalizer(), ctx.device, seed,
                             ctx.image_size, description=f"squeeze {recipe.model}",
                             checkpoint=folder / "checkpoint.pt", precision=ctx.precision, group=ctx.group)
        if ctx.group.is_main:
            heldout = evaluate_model(model, ctx.source("heldout"), ctx.normalizer(), ctx.device,
                                     precision=ctx.precision)
            test = evaluate_model(model, ctx.source("test"), ctx.normalizer(), ctx.device, precision=ctx.precision)
            artifacts.save_state_dict(weights, {k: v.cpu() for k, v in model.state_dict().items()})
            info = {"key": key, "source": "trained", "recipe": dataclasses.asdict(recipe), "seed": seed,
                    "classes": ctx.classes, "heldout_top1": heldout["top1"], "test_top1": test["top1"],
                    "precision": ctx.precision,
                    "seconds": time.perf_counter() - start, "history": result.history,
                    "dataset_fingerprint": ctx.data.fingerprint(), "ranks": ctx.group.world}
            artifacts.atomic_write_json(meta_path, info)
            progress.log(f"teacher {recipe.model}: held-out top-1 {heldout['top1']:.2f}%, "
                         f"test top-1 {test['top1']:.2f}% ({info['seconds']:.0f}s)")
    ctx.group.barrier()
    info = artifacts.read_json(meta_path)
    model = _new_teacher(ctx)
    model.load_state_dict(artifacts.load_state_dict(weights))
    teacher = Teacher(prepare_model(model, ctx.device).eval(), artifacts.sha256_file(weights), info)
    class_order_guard(ctx, teacher)
    return teacher


# The one global the field's training scripts put into a checkpoint besides tensors and numbers:
# torchvision's reference classification script (`references/classification/train.py`, which
# trained the official Tiny-ImageNet teachers) and timm's `train.py` both save their command line
# as `args`, an argparse.Namespace (a plain attribute bag; building one runs no code of the file).
TEACHER_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def _unwrap_checkpoint(obj) -> tuple[dict, list[str] | None]:
    """A bare state dict; {'state_dict'|'model': ..., 'classes': [...]} (our own format);
    torchvision's reference-script checkpoint {'model', 'optimizer', 'lr_scheduler', 'epoch',
    'args'}; or timm train.py's {'state_dict', 'arch', 'args', 'metric', 'optimizer', ...}.
    The model's own weights are taken, never an EMA copy beside them."""
    classes = None
    if isinstance(obj, dict) and "classes" in obj:
        classes = list(obj["classes"])
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state, classes


def load_teacher(ctx: Context, path: str | Path) -> Teacher:
    """A user's checkpoint (weights_only) for the task's teacher architecture, checked against
    the dataset before anything uses it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"teacher checkpoint {path} does not exist: pass the path of a .pt/.pth state dict")
    try:
        obj = artifacts.load_weights_only(path, "teacher checkpoint", TEACHER_CHECKPOINT_GLOBALS)
    except artifacts.UnsafeFileError as exc:
        raise DataError(f"{exc} (argparse.Namespace, the `args` of torchvision's and timm's training scripts, "
                        "is the one object allowed in a teacher checkpoint)") from exc
    state, classes = _unwrap_checkpoint(obj)
    model = _new_teacher(ctx)
    head = model.get_classifier()
    # The checkpoint's head is the tensor under the name the task's architecture gives its classifier
    # weight (ResNet: fc.weight). Matching names by suffix took a MobileNetV2's conv_head.weight for
    # the head and refused it as a teacher of 1280 classes, not as another architecture.
    head_key = next(name for name, p in model.named_parameters() if p is head.weight)
    head_weight = state.get(head_key)
    if head_weight is not None and head_weight.shape[0] != head.out_features:
        raise DataError(f"teacher checkpoint {path} has {head_weight.shape[0]} classes but dataset "
                        f"{ctx.data.spec.name} has {ctx.num_classes}: use a teacher trained on this dataset")
    if classes is not None and classes != ctx.classes:
        diff = next(i for i, (a, b) in enumerate(zip(classes, ctx.classes)) if a != b) if len(classes) == len(
            ctx.classes) else None
        where = f" (first difference at index {diff}: {classes[diff]!r} vs {ctx.classes[diff]!r})" if diff is not None else ""
        raise DataError(f"teacher checkpoint {path} was trained with another class map{where}: "
                        "its class order must equal the dataset's recorded order")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"teacher checkpoint {path} does not fit {ctx.task.teacher.model} at "
                        f"{ctx.image_size}px: {str(exc).splitlines()[0]}") from exc
    info = {"key": None, "source": str(path), "classes": classes or ctx.classes,
            "checkpoint_format": _checkpoint_format(obj)}
    teacher = Teacher(prepare_model(model, ctx.device).eval(), artifacts.sha256_file(path), info)
    class_order_guard(ctx, teacher)
    return teacher


def _checkpoint_format(obj) -> str:
    """Which script's layout the checkpoint has (recorded with the teacher)."""
    if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace):
        return "timm train.py" if "state_dict" in obj and "arch" in obj else "torchvision reference script"
    if isinstance(obj, dict) and ("state_dict" in obj or "model" in obj):
        return "wrapped state dict"
    return "state dict"


def probe_indices(targets: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` held-out images of every class: a fixed probe."""
    return np.concatenate([np.flatnonzero(targets == c)[:per_class] for c in np.unique(targets)])


@torch.no_grad()
def class_order_guard(ctx: Context, teacher: Teacher) -> float:
    """The teacher must classify a probe of real held-out images well above chance under the
    dataset's class map; a mismatch is an error, not a low score. Threshold: min(50%, 10x chance)."""
    bank = ctx.source("heldout")
    idx = probe_indices(bank.labels.numpy(), ctx.task.probe_per_class) if isinstance(bank, ImageBank) else None
    probe = ImageBank(bank.images[idx], bank.labels[idx]) if idx is not None else bank
    accuracy = evaluate_model(teacher.model, probe, ctx.normalizer(), ctx.device, precision=ctx.precision)["top1"]
    threshold = min(50.0, 1000.0 / ctx.num_classes)
    teacher.info["probe_top1"] = accuracy
    if accuracy < threshold:
        raise DataError(
            f"class-order guard: the teacher classifies only {accuracy:.1f}% of held-out real images correctly "
            f"(chance {100 / ctx.num_classes:.1f}%, required {threshold:.1f}%). Its class indices do not match the "
            f"dataset's class order ({', '.join(ctx.classes[:3])}, ...): check that the checkpoint was trained on "
            "this dataset with classes in this order (ImageNet: sorted wnids)")
    return accuracy


@torch.no_grad()
def label_agreement_guard(ctx: Context, teacher: Teacher, bank: ImageBank, where: str, enforce: bool = True) -> float:
    """Top-1 agreement (%) of the task's teacher with the folder labels of a distilled set, no
    augmentation. Sets synthesised from a BN teacher are classified almost perfectly by it, real
    images well above chance; agreement near chance (at most 2x) means the folder -> class map is
    permuted. `enforce`: refuse such a set (a folder without our manifest, whose class map nothing
    else checks); otherwise the value is only recorded."""
    agreement = evaluate_model(teacher.model, bank, ctx.normalizer(), ctx.device, precision=ctx.precision)["top1"]
    chance = 100.0 / ctx.num_classes
    if enforce and agreement <= 2 * chance:
        raise DataError(
            f"label-agreement guard: the task's teacher agrees with the folder labels of {where} on only "
            f"{agreement:.1f}% of its {len(bank)} images (chance {chance:.1f}%). The folder -> class map is probably "
            f"permuted: cdabench maps a folder named after a class of task {ctx.task.name} "
            f"({', '.join(ctx.classes[:3])}, ...) to that class, and a folder ending in a number (new000, the "
            "official releases) to the class of that index. Check the class order of the set (Tiny-ImageNet and ImageNet: sorted wnids; official releases new000...: folder index = "
            "class index), or pass --allow-label-mismatch to evaluate deliberately mislabelled data")
    return agreement


def get_teacher(ctx: Context, teacher_path: str | Path | None = None, train: bool = True) -> Teacher:
    """A user's checkpoint, the task's own checkpoint (`teacher_checkpoint`), or the task's teacher
    from the cache, trained first if missing (unless `train` is False: StageMissing)."""
    if teacher_path:
        return load_teacher(ctx, teacher_path)
    if ctx.task.teacher_checkpoint:
        with task_checkpoint(ctx.task.teacher_checkpoint) as path:
            return load_teacher(ctx, path)
    return train_teacher(ctx, train)


@contextlib.contextmanager
def task_checkpoint(name: str):
    """A task's teacher checkpoint as a file: a packaged one (cdabench/builtin/teachers/<name>),
    else a path; one that is neither is refused with both places named."""
    packaged_file = packaged.builtin("teachers", name)
    if packaged_file.is_file():
        with resources.as_file(packaged_file) as path:
            yield path
        return
    if not Path(name).is_file():
        raise DataError(f"the task's teacher_checkpoint {name!r} is neither a file in cdabench/builtin/teachers/ nor "
                        "a path to a checkpoint: fix the task's teacher_checkpoint, or remove it to train the teacher")
    yield Path(name)
