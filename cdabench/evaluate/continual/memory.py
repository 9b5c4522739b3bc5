"""Memory sources at equal memory: the same number of images per class from random real
exemplars, herding exemplars, or a method's distilled images (cda, sre2l), all produced by
`cdabench distill` (distill.sets.distill) and read back from its folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdabench import artifacts
from cdabench.config import ConfigError, load_method
from cdabench.data import DataError, load_imagefolder
from cdabench.engine.train import ImageBank
from cdabench.evaluate.continual.scenario import subset_by_classes

LABEL_BYTES_PER_IMAGE = 8   # a hard label as the int64 a torch label tensor holds


@dataclass
class Memory:
    """`ipc` images of every class from one source (the first `ipc` of each class of a distilled set)."""

    name: str                 # the method that produced it: random, herding, cda, sre2l, ...
    bank: ImageBank
    ipc: int
    image_bytes: int          # bytes of the stored image files of exactly these images
    images_hash: str
    manifest: dict

    def __len__(self) -> int:
        return len(self.bank)

    def for_classes(self, classes) -> ImageBank:
        return subset_by_classes(self.bank, classes)

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.bank.labels.numpy(), minlength=num_classes).tolist()


def check_memory_name(name: str) -> None:
    """A memory is a method that yields images per class; `full` (every real image) is not one."""
    method = load_method(name)
    if method.kind == "select" and method.strategy == "full":
        raise ConfigError("memory 'full' is the whole training set, not a memory of `ipc` images per class: "
                          "use random, herding, cda or sre2l")


def first_per_class(labels: np.ndarray, ipc: int, num_classes: int, where: str) -> np.ndarray:
    """Indices of the first `ipc` images of every class (in stored order)."""
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < ipc:
            raise DataError(f"{where} holds {len(members)} image(s) of class {c}, fewer than the memory's "
                            f"{ipc} per class: distil it with --ipc {ipc} or more")
        chosen.append(members[:ipc])
    return np.concatenate(chosen)


def load_memory(ctx, folder: str | Path, ipc: int) -> Memory:
    """The first `ipc` images per class of a folder written by `cdabench distill`."""
    folder = Path(folder)
    manifest = artifacts.read_json(folder / "manifest.json")
    if manifest.get("full"):
        raise ConfigError(f"{folder} holds the full training set, not a memory")
    if manifest["classes"] != ctx.classes:
        raise DataError(f"{folder} was distilled with another class map than task {ctx.task.name}")
    images_dir = folder / "images"
    split, _ = load_imagefolder(images_dir, ctx.shape[0], classes=ctx.classes)
    labels = np.asarray(split.targets)
    idx = first_per_class(labels, ipc, ctx.num_classes, str(folder))
    images = split.subset(idx).load_all()
    if tuple(images.shape[1:]) != ctx.shape:
        raise DataError(f"memory images in {folder} are {tuple(images.shape[1:])}, the task works at {ctx.shape}")
    paths = [Path(split.paths[i]) for i in idx]
    rels = [p.relative_to(images_dir).as_posix() for p in paths]
    files = manifest.get("files", {})
    chosen = {rel: artifacts.sha256_file(images_dir / rel) for rel in rels}
    changed = [rel for rel, digest in chosen.items() if rel in files and files[rel] != digest]
    if changed:
        raise DataError(f"{images_dir / changed[0]} changed since it was distilled (sha256 differs from "
                        "manifest.json): re-distil into a fresh folder")
    return Memory(name=manifest["method"], bank=ImageBank(images, torch.as_tensor(labels[idx])), ipc=ipc,
                  image_bytes=sum(p.stat().st_size for p in paths), images_hash=artifacts.hash_file_map(chosen),
                  manifest=manifest)
