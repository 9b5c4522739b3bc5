"""Tiny datasets written at test time in the exact official on-disk layouts.

Everything is produced with the real encoders (PIL for JPEG/PNG, Python 2-style pickles for
CIFAR, struct-packed IDX bytes, gzip) so the loaders read what they would read
from a real download. Pixels encode the class (see `class_colour` /
`class_gray`) so tests can prove the label mapping, and one marker pixel at
row 0, column 1 proves the axis order of array datasets.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
MARKER_RGB = (255, 0, 0)  # at (row 0, column 1) of every CIFAR image
MARKER_GRAY = 255  # at (row 0, column 1) of every MNIST image


def class_colour(label: int) -> tuple[int, int, int]:
    """An RGB colour unique to each of up to 216 classes, levels 40 apart (survives JPEG)."""
    return (20 + 40 * (label % 6), 20 + 40 * ((label // 6) % 6), 20 + 40 * (label // 36))


def class_gray(label: int) -> int:
    """A grey level unique to each of up to 11 classes."""
    return 20 + 20 * label


def write_image(path: Path, colour: Sequence[int], size: tuple[int, int]) -> Path:
    """Write a solid-colour RGB image (size = (width, height)); the suffix picks the encoder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, tuple(colour))
    fmt = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG"}[path.suffix.lower()]
    image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _rgb_images(labels: np.ndarray, size: int) -> np.ndarray:
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = class_colour(int(label))
    images[:, 0, 1] = MARKER_RGB
    return images


def _interleaved_labels(num_classes: int, per_class: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ... so every batch file mixes classes."""
    return np.tile(np.arange(num_classes), per_class).astype(np.int64)


class Python2Pickler(pickle._Pickler):
    """Pickles as the official CIFAR files were written (Python 2 cPickle, protocol 2): every
    string and byte string is a Python 2 `str` (SHORT_BINSTRING / BINSTRING opcodes, read back
    with encoding="latin1"), numpy arrays included, so no `_codecs.encode` call appears as it
    would in a Python 3 protocol-2 pickle of bytes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str


def python2_pickle_bytes(obj) -> bytes:
    """`obj` as the official CIFAR files hold it, numpy's array reconstruction named by its
    numpy 1 module (numpy.core.multiarray), as in the files."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(python2_pickle_bytes(obj))


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the official (N, 3072) channel-major rows."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


# ---------------------------------------------------------------------- CIFAR
def make_cifar10(root: Path, per_class: int = 3, test_per_class: int = 1) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns root."""
    base = Path(root) / "cifar-10-batches-py"
    labels = _interleaved_labels(10, per_class)
    rows = _cifar_rows(_rgb_images(labels, 32))
    for number, chunk in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        _write_pickle(base / f"data_batch_{number}", {
            "batch_label": f"training batch {number} of 5",
            "labels": [int(x) for x in labels[chunk]],
            "data": rows[chunk],
            "filenames": [f"img_{i}.png" for i in chunk],
        })
    test_labels = _interleaved_labels(10, test_per_class)
    _write_pickle(base / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(x) for x in test_labels],
        "data": _cifar_rows(_rgb_images(test_labels, 32)),
        "filenames": [f"test_{i}.png" for i in range(len(test_labels))],
    })
    _write_pickle(base / "batches.meta", {
        "num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072,
    })
    return Path(root)


def cifar100_names() -> list[str]:
    return [f"fine_{i:02d}" for i in range(100)]


def make_cifar100(root: Path, per_class: int = 2, test_per_class: int = 1) -> Path:
    """root/cifar-100-python/{train, test, meta}; returns root."""
    base = Path(root) / "cifar-100-python"
    for name, count in (("train", per_class), ("test", test_per_class)):
        labels = _interleaved_labels(100, count)
        _write_pickle(base / name, {
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{name} batch",
            "fine_labels": [int(x) for x in labels],
            "coarse_labels": [int(x) // 5 for x in labels],
            "data": _cifar_rows(_rgb_images(labels, 32)),
        })
    _write_pickle(base / "meta", {
        "fine_label_names": cifar100_names(),
        "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
    })
    return Path(root)


# ---------------------------------------------------------------------- MNIST
def idx_images_bytes(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def make_mnist(
    root: Path,
    n_train: int = 30,
    n_test: int = 10,
    gz: bool = True,
    name: str = "mnist",
    subdir: str | None = None,
) -> Path:
    """The four IDX files (gzipped when gz) in root/<MNIST|FashionMNIST>/raw, or in
    root/<subdir> when subdir is given ('' = root itself). Label of image i is i % 10.
    Returns root."""
    if subdir is None:
        subdir = ("FashionMNIST" if name == "fashion-mnist" else "MNIST") + "/raw"
    folder = Path(root) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.empty((n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i] = class_gray(int(label))
        images[:, 0, 1] = MARKER_GRAY
        for stem, payload in (
            (f"{prefix}-images-idx3-ubyte", idx_images_bytes(images)),
            (f"{prefix}-labels-idx1-ubyte", idx_labels_bytes(labels)),
        ):
            if gz:
                (folder / (stem + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)
    return Path(root)


# -------------------------------------------------------------- Tiny ImageNet
def tiny_wnids() -> list[str]:
    """The 200 invented wnids in wnids.txt order (deliberately not sorted)."""
    return [f"n{(i * 7) % 200:08d}" for i in range(200)]


def make_tiny_imagenet(root: Path, per_class: int = 2, val_per_class: int = 1) -> Path:
    """root/tiny-imagenet-200 as in tiny-imagenet-200.zip; colour = class_colour(line in wnids.txt).
    Returns root."""
    base = Path(root) / "tiny-imagenet-200"
    wnids = tiny_wnids()
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    annotations = []
    for label, wnid in enumerate(wnids):
        folder = base / "train" / wnid
        boxes = []
        for j in range(per_class):
            write_image(folder / "images" / f"{wnid}_{j}.JPEG", class_colour(label), (64, 64))
            boxes.append(f"{wnid}_{j}.JPEG\t0\t0\t63\t63\n")
        (folder / f"{wnid}_boxes.txt").write_text("".join(boxes))
        for j in range(val_per_class):
            filename = f"val_{label * val_per_class + j}.JPEG"
            write_image(base / "val" / "images" / filename, class_colour(label), (64, 64))
            annotations.append(f"{filename}\t{wnid}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    return Path(root)


# ------------------------------------------------------------- ImageFolder
def make_imagefolder(
    root: Path,
    classes: Sequence[str] = ("a", "b", "c"),
    per_class: int = 3,
    size: tuple[int, int] = (40, 30),
) -> Path:
    """root/train/<class>/* and root/val/<class>/* (ImageNet layout), colour =
    class_colour(index in `classes`), files alternating .png and upper-case .JPEG.
    size is (width, height). Returns root."""
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            for j in range(per_class):
                suffix = ".png" if j % 2 == 0 else ".JPEG"
                write_image(Path(root) / split / name / f"{name}_{j}{suffix}", class_colour(label), size)
    return Path(root)
