"""Readers of distilled sets as the field ships them: one reader per format, in a small registry
(`register_format` refuses a second reader of one name), chosen by name (`--format`, a method
entry's `format`) or detected from the path. Each returns one `ShippedSet`: the images as stored
(uint8 files, or float tensors in the method's value space), class indices in the set's own label
order, and whatever labels and learning rate the method shipped, with the files read and their
hashes. Every tensor file is read weights-only; a file holding anything else is refused with the
reason (artifacts.load_weights_only). What each format is, as each method's own code writes it:

- `tensor-dict`: one .pt holding {"images": N x C x H x W, "labels": N class indices or N x K
  logits[, "lr": learned learning rate]}.
- `mtt` (MTT, `distill.py`): images_<it>.pt (float32 N x C x H x W, saved from the optimised
  tensor) and labels_<it>.pt (int64, class-major); no learning rate.
- `datm` (DATM, `distill/DATM.py`): as MTT in <run>/Normal/, but labels_<it>.pt holds learned
  logits (float N x K; the classes are class-major, [0]*ipc, [1]*ipc, ...) and lr_<it>.pt the
  learned learning rate (a 0-d tensor).
- `dc` (DC/DSA/DM, `main.py`, `main_DM.py`): res_<method>_<dataset>_<model>_<ipc>ipc.pt, a dict
  whose `data` is a list of [images, labels] pairs, one per experiment, beside `accs_all_exps`
  (numpy float64 accuracies: numpy's scalar reconstruction is allowed for this file alone).
- `ddranking` (DD-Ranking's `compute_metrics(image_tensor, soft_labels, syn_lr)` inputs): a folder
  with images.pt (class-major, labels implied), optional labels.pt (N x K logits) and lr.pt.
- `imagefolder`: one sub-folder per class (SRe2L/CDA/G-VBSM/EDC `new000/`, RDED `00000/`, D4M's
  unpadded `0/ 1/ ... 10/`), mapped by class name or by the folder's integer, never by sorted
  name; images stored at another size (D4M: 224 px) are resized to the task's size (recorded).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cdabench import artifacts
from cdabench.data import DataError, load_imagefolder
from cdabench.data.images import ImageSplit


@dataclass
class ShippedSet:
    images: torch.Tensor                  # uint8 pixels, or float32 values in the method's space
    labels: torch.Tensor                  # int64 class indices in the set's own label order
    files: dict[str, str]                 # every file read: path relative to `root` -> sha256
    root: Path
    image_bytes: int
    logits: torch.Tensor | None = None    # per-image logits the method shipped (N x K)
    lr: float | None = None               # the learned learning rate the method shipped
    space: str | None = None              # the space the format implies (uint8 files: pixel)
    paths: list[Path] | None = None       # folder sets: image files in `labels` order
    notes: dict = field(default_factory=dict)   # what the reader did (experiment, resize, file names)


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    read: Callable[..., ShippedSet]       # read(path, channels, image_size, experiment, classes) -> ShippedSet
    detect: Callable[[Path], bool]


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered ({FORMATS[fmt.name].description}): pick another name")
    FORMATS[fmt.name] = fmt
    return fmt


def list_formats() -> list[str]:
    return list(FORMATS)


def detect_format(path: Path) -> str:
    """The first registered format whose layout `path` has; none: refused with the known layouts."""
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt.name
    known = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    raise DataError(f"cannot tell the format of the distilled set at {path}: pass --format (known formats: {known})")


def read_shipped(path: Path, fmt: str, channels: int, image_size: int, classes: list[str],
                 experiment: int = 0) -> ShippedSet:
    """The set at `path` in format `fmt` ("auto": detected) for a task of `classes` at this size."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)} (or auto)")
    shipped = FORMATS[fmt].read(Path(path), channels, image_size, experiment, classes)
    shipped.notes["format"] = fmt
    return shipped


# ---------------------------------------------------------------------- reading tensor files
# DC/DSA/DM's res files and SRe2L's FKD label files hold numpy scalars (accuracies; CutMix box
# corners from np.clip): numpy's scalar reconstruction (numpy 2 and numpy 1 names), np.dtype and the
# dtype classes of numeric kinds (numpy 2 builds a dtype's state into them). They build numbers
# from bytes; nothing else is allowed (an object dtype, for one, is not).
NUMPY_SCALAR_GLOBALS = (np._core.multiarray.scalar, (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                        np.dtype, *(type(np.dtype(code)) for code in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4",
                                                                        "u8", "f2", "f4", "f8")))


def load_tensor_file(path: Path, what: str, allowed: tuple = ()):
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        return artifacts.load_weights_only(path, what, allowed)
    except artifacts.UnsafeFileError as exc:
        raise DataError(str(exc)) from exc


def _tensor(value, what: str, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{what} in {path} is a {type(value).__name__}, not a tensor: save it with torch.save(tensor, ...)")
    return value.detach().cpu()   # an optimised tensor may be saved with requires_grad


def _images(value, path: Path, channels: int, image_size: int) -> torch.Tensor:
    images = _tensor(value, "the images", path)
    if images.ndim != 4:
        raise DataError(f"the images in {path} have shape {tuple(images.shape)}; expected N x C x H x W")
    if tuple(images.shape[1:]) != (channels, image_size, image_size):
        raise DataError(f"the images in {path} are {tuple(images.shape[1:])} (C, H, W) but the task works at "
                        f"{(channels, image_size, image_size)}: evaluate them with a task of their size")
    return images if images.dtype == torch.uint8 else images.float()


def class_major(n: int, num_classes: int, path: Path) -> torch.Tensor:
    """[0]*ipc, [1]*ipc, ...: the label order DC/MTT/DATM initialise and DD-Ranking implies."""
    if n % num_classes:
        raise DataError(f"{path}: {n} images do not split into {num_classes} classes of equal size, so the class-major "
                        "label order ([0]*ipc, [1]*ipc, ...) cannot be implied: ship the class indices too")
    return torch.arange(num_classes).repeat_interleave(n // num_classes)


def _labels_and_logits(value, n: int, path: Path) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(class indices, logits): a 1-D integer tensor holds class indices; an N x K float tensor
    holds logits (its classes are class-major, filled in by the caller)."""
    labels = _tensor(value, "the labels", path)
    if labels.ndim == 1 and not labels.is_floating_point():
        if len(labels) != n:
            raise DataError(f"{path} holds {len(labels)} labels for {n} images")
        return labels.long(), None
    if labels.ndim == 2 and labels.is_floating_point():
        if len(labels) != n:
            raise DataError(f"{path} holds {len(labels)} rows of logits for {n} images")
        return None, labels.float()
    raise DataError(f"the labels in {path} have shape {tuple(labels.shape)} and dtype {labels.dtype}: expected N class "
                    "indices (integers) or N x K logits (floats)")


def _lr(value, path: Path) -> float:
    lr = _tensor(value, "the learning rate", path) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if lr.numel() != 1:
        raise DataError(f"the learning rate in {path} has {lr.numel()} values; expected one (a 0-d tensor)")
    return float(lr.reshape(()).item())


def _shipped(images, labels, logits, files: dict[Path, str], root: Path, lr=None, notes=None) -> ShippedSet:
    if labels is None:
        labels = class_major(len(images), logits.shape[1], root)
    return ShippedSet(images, labels, {p.relative_to(root).as_posix(): h for p, h in files.items()}, root,
                      sum(p.stat().st_size for p in files), logits=logits, lr=lr,
                      space="pixel" if images.dtype == torch.uint8 else None, notes=notes or {})


# ---------------------------------------------------------------------- the formats
def read_tensor_dict(path: Path, channels: int, image_size: int, experiment: int, classes: list[str]) -> ShippedSet:
    data = load_tensor_file(path, "distilled set")
    if not isinstance(data, dict) or "images" not in data or "labels" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} is not a tensor-dict set: expected a dict with 'images' and 'labels' (got {keys})")
    images = _images(data["images"], path, channels, image_size)
    labels, logits = _labels_and_logits(data["labels"], len(images), path)
    if labels is not None and data.get("logits") is not None:
        logits = _labels_and_logits(data["logits"], len(images), path)[1]
    lr = _lr(data["lr"], path) if data.get("lr") is not None else None
    return _shipped(images, labels, logits, {path: artifacts.sha256_file(path)}, path.parent, lr)


_ITERATION = re.compile(r"^images_(?:zca_)?(.+)\.pt$")


def _mtt_images_file(path: Path) -> Path:
    if path.is_dir():
        for folder in (path, path / "Normal"):   # DATM writes <run>/Normal/
            if (folder / "images_best.pt").is_file():
                return folder / "images_best.pt"
        raise DataError(f"{path} holds no images_best.pt (nor Normal/images_best.pt): pass the images_<it>.pt file")
    return path


def read_mtt(path: Path, channels: int, image_size: int, experiment: int, classes: list[str]) -> ShippedSet:
    images_path = _mtt_images_file(path)
    match = _ITERATION.match(images_path.name)
    if match is None:
        raise DataError(f"{images_path} is not named images_<iteration>.pt, as MTT and DATM save their images")
    it = match.group(1)
    labels_path = images_path.with_name(f"labels_{it}.pt")
    lr_path = images_path.with_name(f"lr_{it}.pt")
    images = _images(load_tensor_file(images_path, "distilled images"), images_path, channels, image_size)
    labels, logits = _labels_and_logits(load_tensor_file(labels_path, "distilled labels"), len(images), labels_path)
    files = {images_path: artifacts.sha256_file(images_path), labels_path: artifacts.sha256_file(labels_path)}
    lr = None
    if lr_path.is_file():
        lr = _lr(load_tensor_file(lr_path, "learned learning rate"), lr_path)
        files[lr_path] = artifacts.sha256_file(lr_path)
    notes = {"iteration": it}
    shipped = _shipped(images, labels, logits, files, images_path.parent, lr, notes)
    if images_path.name.startswith("images_zca_"):
        # MTT/DATM write the inverse-whitened images under this name: pixel space, not ZCA.
        shipped.space = "pixel"
        notes["images_zca_file"] = "inverse-whitened pixel-space images (MTT/DATM's images_zca_<it>.pt)"
    return shipped


def read_dc(path: Path, channels: int, image_size: int, experiment: int, classes: list[str]) -> ShippedSet:
    data = load_tensor_file(path, "DC/DSA/DM result file", NUMPY_SCALAR_GLOBALS)
    experiments = data.get("data") if isinstance(data, dict) else None
    if not isinstance(experiments, list) or not experiments:
        raise DataError(f"{path} is not a DC/DSA/DM res_*.pt file: expected a dict whose 'data' is a list of "
                        "[images, labels] pairs, one per experiment")
    if not 0 <= experiment < len(experiments):
        raise DataError(f"{path} holds {len(experiments)} experiment(s); experiment = {experiment} does not exist "
                        f"(use 0..{len(experiments) - 1})")
    pair = experiments[experiment]
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise DataError(f"experiment {experiment} in {path} is not an [images, labels] pair")
    images = _images(pair[0], path, channels, image_size)
    labels, logits = _labels_and_logits(pair[1], len(images), path)
    notes = {"experiment": experiment, "experiments": len(experiments)}
    return _shipped(images, labels, logits, {path: artifacts.sha256_file(path)}, path.parent, None, notes)


def read_ddranking(path: Path, channels: int, image_size: int, experiment: int, classes: list[str]) -> ShippedSet:
    folder = path if path.is_dir() else path.parent
    images_path = folder / "images.pt"
    images = _images(load_tensor_file(images_path, "distilled images"), images_path, channels, image_size)
    files = {images_path: artifacts.sha256_file(images_path)}
    labels, logits = None, None
    if (folder / "labels.pt").is_file():
        labels, logits = _labels_and_logits(load_tensor_file(folder / "labels.pt", "soft labels"), len(images),
                                            folder / "labels.pt")
        files[folder / "labels.pt"] = artifacts.sha256_file(folder / "labels.pt")
        if labels is not None:
            raise DataError(f"{folder / 'labels.pt'} holds class indices; DD-Ranking's labels.pt holds N x K soft labels "
                            "(its class indices are implied class-major): use --format tensor-dict for hard labels")
    lr = None
    if (folder / "lr.pt").is_file():
        lr = _lr(load_tensor_file(folder / "lr.pt", "learned learning rate"), folder / "lr.pt")
        files[folder / "lr.pt"] = artifacts.sha256_file(folder / "lr.pt")
    if logits is None:   # no soft labels: the classes are still class-major
        labels = class_major(len(images), len(classes), folder)
    return _shipped(images, labels, logits, files, folder, lr, {"labels": "class-major, implied"})


def read_imagefolder(path: Path, channels: int, image_size: int, experiment: int, classes: list[str]) -> ShippedSet:
    """Class folders mapped onto `classes` (by name, else by the folder's trailing integer: D4M's
    `10` is class 10, not the third folder in sorted order); images of another size are resized."""
    if not path.is_dir():
        raise DataError(f"distilled data folder {path} does not exist: pass the --out folder of `cdabench distill`, "
                        "an ImageFolder of images (one sub-folder per class), or a tensor file with --format")
    split, _ = load_imagefolder(path, channels, classes=classes)
    first = split[0][0]
    notes = {}
    if tuple(first.shape[-2:]) != (image_size, image_size):
        notes["resized_from"] = list(first.shape[-2:])
        split = ImageSplit.from_files(split.paths, split.targets, channels, root=path, resize_to=image_size)
    images = split.load_all()
    files = {Path(p).relative_to(path).as_posix(): artifacts.sha256_file(p) for p in split.paths}
    return ShippedSet(images, torch.as_tensor(np.asarray(split.targets)), files, path,
                      sum(Path(p).stat().st_size for p in split.paths), space="pixel", paths=list(split.paths),
                      notes=notes)


def _is_pt(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt"


register_format(Format("dc", "DC/DSA/DM res_<method>_<dataset>_<model>_<ipc>ipc.pt (a dict whose 'data' lists "
                             "[images, labels] per experiment)", read_dc,
                       lambda p: _is_pt(p) and p.name.startswith("res_")))
register_format(Format("datm", "DATM: images_<it>.pt, labels_<it>.pt (learned logits), lr_<it>.pt, in <run>/Normal/",
                       read_mtt, lambda p: (_is_pt(p) and _ITERATION.match(p.name) is not None
                                            and p.with_name("lr_" + _ITERATION.match(p.name).group(1) + ".pt").is_file())
                       or (p.is_dir() and any((f / "lr_best.pt").is_file() for f in (p, p / "Normal")))))
register_format(Format("mtt", "MTT: images_<it>.pt and labels_<it>.pt (class indices) in the run folder",
                       read_mtt, lambda p: (_is_pt(p) and _ITERATION.match(p.name) is not None)
                       or (p.is_dir() and any((f / "images_best.pt").is_file() for f in (p, p / "Normal")))))
register_format(Format("ddranking", "DD-Ranking's inputs: a folder with images.pt (class-major), optional "
                                    "labels.pt (N x K soft labels) and lr.pt", read_ddranking,
                       lambda p: (p.is_dir() and (p / "images.pt").is_file()) or (_is_pt(p) and p.name == "images.pt")))
register_format(Format("tensor-dict", "one .pt file holding {'images', 'labels'[, 'logits', 'lr']}", read_tensor_dict,
                       _is_pt))
register_format(Format("imagefolder", "one sub-folder of images per class (SRe2L/CDA new000/, RDED 00000/, D4M 0/ ... "
                                      "10/; ours)", read_imagefolder, lambda p: p.is_dir()))
