"""Everything a stage needs about one task on one machine: the dataset and its splits, the
device, the cache folder, the process group. Built once per command by `open_context`."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from cdabench.data import DataError, ImageSplit, RealData, create_dataset, stratified_holdout
from cdabench.data.prepared import prepared_split
from cdabench.engine.models import create_model, describe_adaptation
from cdabench.engine.runtime import ProcessGroup, check_precision, init_process_group, resolve_device
from cdabench.engine.train import ImageBank, Normalizer, StreamedImages
from cdabench.schema import Task, TrainRecipe

IN_MEMORY_LIMIT = 4 << 30  # bytes of uint8 pixels held as one tensor; larger sets stream from disk


def default_cache_dir() -> Path:
    if "CDABENCH_CACHE" in os.environ:
        return Path(os.environ["CDABENCH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "cdabench"


def eval_transform(data: RealData):
    """Fixed-size datasets are used as stored; photos are resized (shorter side S*256/224) and
    centre-cropped to S, the standard ImageNet evaluation view, for every split and method."""
    if data.spec.fixed_size:
        return None
    size = data.image_size
    return v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)])


@dataclass
class Context:
    task: Task
    data: RealData
    fit: ImageSplit          # train minus held-out: what the teacher and every method may use
    heldout: ImageSplit      # seeded stratified held-out part of train: tuning + class-order probe
    device: torch.device
    cache: Path
    group: ProcessGroup = field(default_factory=ProcessGroup)
    _sources: dict = field(default_factory=dict, repr=False)

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    @property
    def image_size(self) -> int:
        return self.data.image_size

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data.spec.channels, self.image_size, self.image_size)

    @property
    def precision(self) -> str:
        """fp32 | bf16: the autocast of every forward pass of every stage (the task's, or --precision)."""
        return self.task.precision

    @property
    def mean(self):
        return self.data.spec.mean

    @property
    def std(self):
        return self.data.spec.std

    def new_model(self, recipe: TrainRecipe) -> torch.nn.Module:
        """A fresh model of `recipe.model` for this task's classes, channels and size (with the
        recipe's patch size); seed torch before calling for a reproducible init."""
        return create_model(recipe.model, self.num_classes, self.shape[0], self.image_size, recipe.patch_size,
                            recipe.zero_init_residual)

    def adaptation(self, recipe: TrainRecipe) -> str:
        """How `new_model(recipe)` departs from the stock architecture (recorded with results)."""
        return describe_adaptation(recipe.model, self.image_size, recipe.patch_size, recipe.zero_init_residual)

    def normalizer(self) -> Normalizer:
        return Normalizer(self.mean, self.std, self.device)

    def split(self, name: str) -> ImageSplit:
        return {"fit": self.fit, "heldout": self.heldout, "test": self.data.test}[name]

    def source(self, name: str):
        """The split as uint8 batches of the working size. Image files: from the prepared cache
        (decoded once, memory-mapped; cdabench/data/prepared.py) unless $CDABENCH_PREPARED=0,
        else streamed by $CDABENCH_LOADER_WORKERS persistent DataLoader workers when too large
        for memory; a copy's container files (data/copies.py) the same way. In-memory datasets
        (digits, CIFAR, MNIST): held as one tensor."""
        if name not in self._sources:
            split = self.split(name).with_transform(eval_transform(self.data))
            pixels = len(split) * int(np.prod(self.shape))
            if split.file_backed and os.environ.get("CDABENCH_PREPARED", "1") != "0":
                images, targets = self._prepared(name, split)
                self._sources[name] = ImageBank(images, targets)
            elif pixels <= IN_MEMORY_LIMIT:
                self._sources[name] = ImageBank(split.load_all(), torch.as_tensor(split.targets))
            else:
                self._sources[name] = StreamedImages(split, workers=loader_workers())
        return self._sources[name]

    def _prepared(self, name: str, split: ImageSplit):
        """The first process to ask builds the prepared view (in parallel processes when large);
        other ranks and workers wait on its lock file, then map it."""
        view = f"{self.data.spec.name} {name} {eval_transform(self.data)!r}"
        workers = min(8, os.cpu_count() or 1) if len(split) >= 4096 else 0
        return prepared_split(split, self.cache / "prepared", view, self.shape, workers)


def loader_workers() -> int:
    """DataLoader processes per streamed source ($CDABENCH_LOADER_WORKERS, default 4)."""
    value = os.environ.get("CDABENCH_LOADER_WORKERS", "4")
    if not value.isdigit():
        raise DataError(f"CDABENCH_LOADER_WORKERS must be a non-negative number, got {value!r}")
    return int(value)


def open_context(task: Task, data_root: str | None, device: str = "auto", cache: str | Path | None = None,
                 precision: str | None = None) -> Context:
    """`precision` (the command's --precision) overrides the task's; bf16 needs a device that runs it natively."""
    dev = resolve_device(device)
    if precision is not None:
        task = dataclasses.replace(task, precision=precision)
    check_precision(task.precision, dev)
    group = init_process_group(dev)
    cache_dir = Path(cache) if cache else default_cache_dir()
    data = create_dataset(task.dataset, data_root, task.image_size, cache_dir)
    # Rank 0 alone computes the fingerprint, from the cache when one directory scan finds the same
    # files as a run before (else with a stat of every file, kept for the next run and workers).
    fingerprint = data.fingerprint(cache_dir / "fingerprints") if group.is_main else None
    if group.world > 1:
        data._fingerprint = group.broadcast(fingerprint)
    fit_idx, heldout_idx = stratified_holdout(np.asarray(data.train.targets), per_class=task.holdout_per_class,
                                              fraction=task.holdout_fraction, seed=task.split_seed)
    return Context(task, data, data.train.subset(fit_idx), data.train.subset(heldout_idx), dev, cache_dir, group)


def class_counts(split: ImageSplit, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(split.targets), minlength=num_classes)


def check_ipc(ctx: Context, ipc: int) -> None:
    counts = class_counts(ctx.fit, ctx.num_classes)
    smallest = int(counts.min())
    if ipc > smallest:
        worst = ctx.classes[int(counts.argmin())]
        raise DataError(f"IPC {ipc} is larger than class {worst!r} has ({smallest} real training images after the "
                        f"held-out split): choose --ipc <= {smallest}, or use a recover method (cda, sre2l), "
                        "which synthesises images")
