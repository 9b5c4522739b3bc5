"""The test suite's one set of helpers (the pytest fixtures built on them are in conftest.py).

- Tiny tasks and suites: TINY_TASK_TOML is the one base task; `tiny_task_file` writes it, or a
  variant of it by overrides, for the CLI and the Python API alike; `suite_file` writes a suite
  on such a task the same way (TINY_SUITE, TINY_CONTINUAL_SUITE).
- `child_env`: the environment of every process a test starts (one thread, this checkout first).
- Tiny networks: a seeded BN CNN for the recover and relabel tests.
- Killing a run part-way as Ctrl-C would (`interrupt_at`), and watching progress bars (`bars_seen`).
- Tiny datasets written at test time in the exact official on-disk layouts. Everything is
  produced with the real encoders (PIL for JPEG/PNG, Python 2-style pickles for CIFAR,
  struct-packed IDX bytes, gzip) so the loaders read what they would read from a real download.
  Pixels encode the class (see `class_colour` / `class_gray`) so tests can prove the label
  mapping, and one marker pixel at row 0, column 1 proves the axis order of array datasets.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import pickle
import random
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import tomli_w
import torch
from PIL import Image
from torch import nn

from cdabench import progress, records

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ tiny tasks and suites
# cdabench/builtin/tasks/digits.toml (ResNet-18 at 8 px) shrunk for a 2-core CPU: teacher 3 epochs,
# recover 5 iterations, post-train 2 epochs, IPC 2. Every tiny task of the tests is this one, or
# this one with some settings overridden (`tiny_task_file`); tasks that keep its [teacher] table
# share the teacher the session trains once (conftest.py: `tiny_teacher`, `private_cache`).
TINY_TASK_TOML = """\
description = "cdabench/builtin/tasks/digits.toml shrunk for the test suite"
dataset = "digits"
image_size = 8
ipcs = [2]
holdout_fraction = 0.1
split_seed = 0

# 3 epochs reach ~99 % held-out top-1 without augmentation (with the task's crop + flip they
# stay near 30 %, below the class-order guard's 50 %).
[teacher]
model = "resnet18"
epochs = 3
batch_size = 64
optimizer = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
warmup_epochs = 0
schedule = "cosine"
augment = { crop = "none", flip = false }

[recover.sre2l]
iterations = 5
lr = 0.25
r_bn = 0.01
batch_size = 100
jitter = 1

[recover.cda]
iterations = 5
lr = 0.25
r_bn = 0.01
batch_size = 100
jitter = 1

[posttrain.recipe]
epochs = 2
batch_size = 50
optimizer = "adamw"
lr = 0.001
weight_decay = 0.01
decay_matrices_only = true
schedule = "cosine"
augment = { crop = "rrc", min_scale = 0.25, flip = true }

[posttrain.kd]
mode = "online"
temperature = 4.0
t_squared = true
"""

# A cross-arch suite on a tiny task: CDA and random real images, ResNet-18, random also with hard
# labels, one seed (3 cells).
TINY_SUITE = {"methods": ["cda", "random"], "students": ["resnet18"], "hard_label_methods": ["random"],
              "seeds": [0]}

# A continual suite on a tiny task: every retrain memory (CDA also unmasked) and every strategy,
# 5 steps, timm's 0.37 M-parameter test_resnet as the student.
TINY_CONTINUAL_SUITE = {
    "kind": "continual", "steps": [5], "memories": ["random", "herding", "cda", "sre2l"], "unmasked": ["cda"],
    "strategies": ["naive", "replay", "gdumb", "lwf", "ewc", "der", "er_ace"], "student": "test_resnet",
    "retrain_epochs": 3, "sequential": {"epochs": 1, "lr": 0.003},
}


def override(settings: dict, overrides: dict | None = None, **more) -> dict:
    """A deep copy of `settings` with each override applied. A key is a dotted path
    ("teacher.epochs", "recover.cda", "posttrain.recipe.augment"); its value replaces whatever was
    there (a whole table, if it names one), and None removes the key (which must exist)."""
    settings = copy.deepcopy(settings)
    for key, value in {**(overrides or {}), **more}.items():
        *parents, leaf = key.split(".")
        table = settings
        for name in parents:
            table = table.setdefault(name, {})
        if value is None:
            if leaf not in table:
                raise KeyError(f"cannot remove {key!r}: the settings have no such key")
            del table[leaf]
        else:
            table[leaf] = copy.deepcopy(value)
    return settings


def tiny_task(overrides: dict | None = None, **more) -> dict:
    """The base tiny task's settings (TINY_TASK_TOML) with overrides (see `override`)."""
    return override(tomllib.loads(TINY_TASK_TOML), overrides, **more)


def write_toml(path: Path, settings: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(settings))
    return path


def tiny_task_file(path: Path, overrides: dict | None = None, **more) -> Path:
    """Write the base tiny task, or a variant of it, to `path` (the task's name is the file's stem):
    tiny_task_file(p) is TINY_TASK_TOML; tiny_task_file(p, {"teacher.epochs": 4}, ipcs=[4]) a variant."""
    return write_toml(path, tiny_task(overrides, **more))


def suite_file(path: Path, task, overrides: dict | None = None, *, base: dict = TINY_SUITE, **more) -> Path:
    """Write a suite on `task` (a task name or the path of a task file) to `path` (the suite's name
    is the file's stem): `base` (TINY_SUITE, TINY_CONTINUAL_SUITE, or {}) with overrides."""
    task = task.as_posix() if isinstance(task, Path) else str(task)
    return write_toml(path, override({"task": task, **base}, overrides, **more))


# ------------------------------------------------------------------------ processes and the command line
def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts (a CLI run, torchrun, a script): one thread, as in
    this process (conftest.py), and this checkout's cdabench first on the path; `extra` on top."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


@contextmanager
def one_thread():
    """One intra-op thread in this process for the block (the thread count before it restored
    after). A test that compares numbers across processes bit for bit pins this itself: a CPU
    convolution's or matmul's reduction order follows the number of threads, so equal results need
    equal thread counts in every process, not only the one conftest.py sets for the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_for(condition, timeout: float, every: float = 0.1) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds have passed; whether it became true.
    Tests wait on conditions, not on the clock: a deadline is generous (a loaded machine is slow)
    and a healthy run meets the condition long before it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this process; return its exit code and everything it printed,
    whitespace-normalised (rich wraps long messages at the console width)."""
    from cdabench.cli import main
    code = main(argv)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def squeezed(text: str) -> str:
    """The text without any whitespace: rich may fold a long path in the middle."""
    return "".join(text.split())


# ------------------------------------------------------------------------ records
# Hand-made cross-arch records for the tests of reports, leaderboards and checks.
STUDENTS = ("resnet18", "resnet50", "mobilenetv2", "deit_tiny")


def make_record(method: str, ipc, student: str, seed: int, top1: float, labels: str = "soft", task: str = "digits") -> dict:
    record = {
        "schema_version": records.SCHEMA_VERSION, "task": task, "dataset": task, "method": method, "ipc": ipc,
        "student": student, "labels": labels, "label_protocol": "online-kd" if labels == "soft" else "hard",
        "seed": seed, "top1": top1, "top5": min(100.0, top1 + 5), "heldout_top1": top1, "epochs": 10,
        "num_images": 100, "image_bytes": 8000, "label_bytes": 0, "teacher_forwards": 1000,
        "seconds": {"recover": 1.0, "posttrain": 2.0}, "device": "cpu:test", "command": "cdabench run --suite t",
        "versions": {"cdabench": "0.1.0", "torch": "2.14.1", "timm": "1.0.31"},
        "hashes": {"images": "x", "labels": None, "teacher": "t", "eval_config": "e", "classes": "c"},
    }
    record["record_hash"] = records.record_id(record)
    return record


def write_records(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return folder


def grid_records(shift: dict | None = None) -> list[dict]:
    base = {"cda": 80.0, "sre2l": 75.0, "random": 85.0, "herding": 84.0}
    rows = []
    for method, acc in base.items():
        for k, student in enumerate(STUDENTS):
            for seed in (0, 1, 2):
                rows.append(make_record(method, 10, student, seed, acc - k + seed + (shift or {}).get(method, 0.0)))
    rows += [make_record("full", None, s, seed, 98.0) for s in STUDENTS for seed in (0, 1, 2)]
    return rows


def shuffled_runs(folder: Path, rows: list[dict], seed: int) -> list[Path]:
    """`rows` in a shuffled order, each record's keys shuffled too, split over two run folders,
    returned in reverse order: what a leaderboard must not depend on."""
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    folders = []
    for part, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2:])):
        lines = []
        for r in chunk:
            keys = list(r)
            rng.shuffle(keys)
            lines.append(json.dumps({k: r[k] for k in keys}) + "\n")
        path = folder / f"part{part}"
        path.mkdir(parents=True)
        (path / "records.jsonl").write_text("".join(lines))
        folders.append(path)
    return folders[::-1]


def leaderboard_in_subprocess(out: Path, runs: list[Path], mpl_config: Path) -> dict[str, bytes]:
    """`cdabench leaderboard`'s generate() in a fresh process; {file name: bytes} of what it wrote."""
    import subprocess
    import sys
    code = ("import sys; from pathlib import Path; from cdabench.results.leaderboard import generate; "
            "generate([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(out), *map(str, runs)], cwd=REPO,
                          env=child_env(MPLCONFIGDIR=str(mpl_config)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}



# ------------------------------------------------------------------------ global random state
def global_rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(before):
    after = global_rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]



# ------------------------------------------------------------------------ tiny networks
class TinyBNNet(nn.Sequential):
    """Two conv + BatchNorm2d blocks, global pooling and a linear head."""

    def __init__(self, in_chans: int = 1, num_classes: int = 3, width: int = 4):
        super().__init__(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def make_tiny_bn_net(in_chans: int = 1, num_classes: int = 3, seed: int = 0, size: int = 8) -> nn.Module:
    """A seeded tiny BN CNN in eval mode whose running statistics are not the defaults."""
    torch.manual_seed(seed)
    net = TinyBNNet(in_chans, num_classes)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, in_chans, size, size) * 2 - 0.5)
    return net.eval()


# ------------------------------------------------------------------------ interrupting a run
# Killing a run part-way, as Ctrl-C would: a progress listener (cdabench.progress.listen) raises
# KeyboardInterrupt from inside the stage, at the point where its own bar reports the unit of work
# (a suite's cell, a recover step) that the test names. The tests of resuming use it; production
# code has no parameter for it.
@contextmanager
def interrupt_at(bar: str, units: int):
    """KeyboardInterrupt from the `advance` that brings a bar whose description starts with `bar`
    to `units` units done (a suite's bar counts cells, "recover" counts shard steps)."""
    def listener(b: progress.Bar) -> None:
        if b.description.startswith(bar) and b.done >= units:
            raise KeyboardInterrupt(f"interrupted at {b.done}/{b.total} of {b.description!r}")
    with progress.listen(listener):
        yield


@contextmanager
def bars_seen():
    """{description: (done, total)} of every bar that advanced inside the block."""
    seen: dict[str, tuple[int, int]] = {}

    def listener(b: progress.Bar) -> None:
        seen[b.description] = (b.done, b.total)
    with progress.listen(listener):
        yield seen


# ------------------------------------------------------------------------ tiny datasets
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


# ------------------------------------------------------------- distilled sets as the field ships them
# Each builder writes a set exactly as the method's own code saves it (issue 19; docs/bring-your-own.md):
# the same containers, dtypes, file names and label orders. `images01` are [0, 1] float images
# (N, C, H, W) in class-major order ([0]*ipc, [1]*ipc, ...), the order these methods initialise.
def class_major_labels(num_classes: int, ipc: int) -> torch.Tensor:
    """DC/MTT/DATM's label_syn: torch.tensor([np.ones(ipc) * i for i in range(K)], dtype=long).view(-1)."""
    return torch.tensor(np.array([np.ones(ipc) * i for i in range(num_classes)]), dtype=torch.long).view(-1)


def normalise(ctx, images01: torch.Tensor) -> torch.Tensor:
    """(pixel - mean) / std with the task's constants: what MTT, DC and DD-Ranking save without ZCA."""
    return (images01 - torch.tensor(ctx.mean).view(1, -1, 1, 1)) / torch.tensor(ctx.std).view(1, -1, 1, 1)


def numpy_kornia_zca(train01: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kornia.enhance.ZCAWhitening(eps).fit, written out with numpy in float64 (eigh of the unbiased
    covariance of the flattened images): (mean (1, D), T, T_inv), T = U (S + eps)^-1/2 U^T."""
    x = train01.reshape(len(train01), -1).astype(np.float64)
    mean = x.mean(axis=0, keepdims=True)
    cov = (x - mean).T @ (x - mean) / (len(x) - 1)
    s, u = np.linalg.eigh(cov)
    s = np.clip(s, 0.0, None)   # eigh may return -1e-17 for a zero eigenvalue
    return mean, (u / np.sqrt(s + eps)) @ u.T, (u * np.sqrt(s + eps)) @ u.T


def _optimised(t: torch.Tensor) -> torch.Tensor:
    """The synthetic tensor as those scripts hold it: a leaf that requires grad."""
    return t.detach().clone().float().requires_grad_(True)


def save_mtt(folder: Path, images: torch.Tensor, labels: torch.Tensor, iteration: str = "best") -> Path:
    """MTT distill.py: torch.save(image_syn.cpu(), images_<it>.pt), torch.save(label_syn.cpu(), labels_<it>.pt)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_optimised(images), folder / f"images_{iteration}.pt")
    torch.save(labels.cpu(), folder / f"labels_{iteration}.pt")
    return folder


def save_datm(run: Path, images: torch.Tensor, logits: torch.Tensor, lr: float, iteration: str = "best") -> Path:
    """DATM distill/DATM.py: <run>/Normal/images_<it>.pt, labels_<it>.pt (learned logits, a leaf that
    requires grad) and lr_<it>.pt (syn_lr.detach().cpu(), a 0-d tensor)."""
    folder = run / "Normal"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_optimised(images), folder / f"images_{iteration}.pt")
    torch.save(_optimised(logits), folder / f"labels_{iteration}.pt")
    torch.save(torch.tensor(lr).detach().cpu(), folder / f"lr_{iteration}.pt")
    return run


def save_dc(folder: Path, experiments: list[tuple[torch.Tensor, torch.Tensor]], method: str = "DC",
            dataset: str = "digits", model: str = "ConvNet", ipc: int = 2) -> Path:
    """DC/DSA/DM main.py: torch.save({'data': data_save, 'accs_all_exps': accs_all_exps}, res_...pt),
    data_save a list of [images, labels] per experiment (detached copies), the accuracies numpy
    float64 (np.sum(np.equal(...)) / n in their evaluate_synset)."""
    folder.mkdir(parents=True, exist_ok=True)
    data_save = [[copy.deepcopy(x.detach().cpu()), copy.deepcopy(y.detach().cpu())] for x, y in experiments]
    accs = {model: [np.sum(np.equal(np.arange(10), np.arange(10) % (k + 2))) / 10 for k in range(len(experiments))]}
    path = folder / f"res_{method}_{dataset}_{model}_{ipc}ipc.pt"
    torch.save({"data": data_save, "accs_all_exps": accs}, path)
    return path


def save_ddranking(folder: Path, images: torch.Tensor, soft_labels: torch.Tensor | None = None,
               lr: float | None = None) -> Path:
    """What DD-Ranking's README loads with torch.load: images.pt (class-major), labels.pt (N x K soft
    labels), lr.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(images.detach().cpu(), folder / "images.pt")
    if soft_labels is not None:
        torch.save(soft_labels.detach().cpu(), folder / "labels.pt")
    if lr is not None:
        torch.save(torch.tensor(lr), folder / "lr.pt")
    return folder


def _pil(image01: torch.Tensor) -> Image.Image:
    array = (image01.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_d4m_folder(root: Path, images01: torch.Tensor, labels: torch.Tensor, size: int = 224) -> Path:
    """D4M gen_syn_image.py: <root>/<class index>/<index>-image<i><j>.png, unpadded integer folder
    names, every image resized to 224 px (PIL's default resample)."""
    counters: dict[int, int] = {}
    for image, label in zip(images01, labels.tolist()):
        j = counters.get(label, 0)
        counters[label] = j + 1
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        _pil(image).resize((size, size)).save(root / str(label) / f"{label}-image0{j}.png")
    return root


def save_sre2l_folder(root: Path, images01: torch.Tensor, labels: torch.Tensor) -> Path:
    """SRe2L/CDA recover: new{cls:03d}/class{cls:03d}_id{ipc:03d}.jpg (here PNG, as on CIFAR/Tiny in some)."""
    counters: dict[int, int] = {}
    for image, label in zip(images01, labels.tolist()):
        k = counters.get(label, 0)
        counters[label] = k + 1
        (root / f"new{label:03d}").mkdir(parents=True, exist_ok=True)
        _pil(image).save(root / f"new{label:03d}" / f"class{label:03d}_id{k:03d}.png")
    return root


def sre2l_rand_bbox(size, lam):
    """SRe2L utils_fkd.rand_bbox: numpy int64 corners (rows x1:x2, columns y1:y2)."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx, cy = np.random.randint(W), np.random.randint(H)
    return (np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H),
            np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H))


def save_fkd_labels(fkd_dir: Path, image_root: Path, teacher, normalize, epochs: int, batch_size: int,
                    mix: str = "cutmix", seed: int = 42, input_size: int | None = None) -> list[list[torch.Tensor]]:
    """SRe2L relabel/generate_soft_label.py on the image folder `image_root`: torchvision's ImageFolder
    order, one RandomSampler(generator seeded `seed`) across epochs, batches of `batch_size`; per image a
    RandomResizedCrop box saved as fractions and a flip; per batch CutMix (Beta(1, 1), numpy box) or
    Mixup (Beta(0.8, 0.8)) or none; fp16 logits of the teacher on the mixed batch. Each batch file is
    the 6-element list [coords, flip, mix_index, mix_lam, mix_bbox, logits]. The crops run on tensors
    (torchvision's resized_crop), so a test can compare replayed views exactly; returns the mixed views
    [epoch][batch] (un-normalised)."""
    import torchvision
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms import functional as t_F

    dataset = torchvision.datasets.ImageFolder(str(image_root))
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    np.random.seed(seed)
    torch.manual_seed(seed)
    views_all = []
    for epoch in range(epochs):
        (fkd_dir / f"epoch_{epoch}").mkdir(parents=True, exist_ok=True)
        order = list(sampler)
        views_epoch = []
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            crops, coords, flips = [], [], []
            for i in idx:
                img = t_F.pil_to_tensor(dataset.loader(dataset.samples[i][0]).convert(
                    "L" if teacher_channels(teacher) == 1 else "RGB")).float() / 255
                h_img, w_img = img.shape[-2:]
                size = input_size or h_img
                top, left, h, w = RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                coords.append(torch.FloatTensor((top / h_img, left / w_img, h / h_img, w / w_img)))
                view = t_F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
                flip = bool(torch.rand(1) < 0.5)
                crops.append(t_F.hflip(view) if flip else view)
                flips.append(flip)
            images = torch.stack(crops)
            mix_index = mix_lam = mix_bbox = None
            if mix == "cutmix":
                mix_index = torch.randperm(len(idx))
                mix_lam = np.random.beta(1.0, 1.0)
                x1, y1, x2, y2 = sre2l_rand_bbox(images.size(), mix_lam)
                images[:, :, x1:x2, y1:y2] = images[mix_index, :, x1:x2, y1:y2]
                mix_bbox = [x1, y1, x2, y2]
            elif mix == "mixup":
                mix_index = torch.randperm(len(idx))
                mix_lam = np.random.beta(0.8, 0.8)
                images = mix_lam * images + (1 - mix_lam) * images[mix_index]
            with torch.no_grad():
                logits = teacher(normalize(images)).half()
            batch = [torch.stack(coords), torch.tensor(flips), mix_index, mix_lam, mix_bbox, logits.cpu()]
            torch.save(batch, fkd_dir / f"epoch_{epoch}" / f"batch_{b // batch_size}.tar")
            views_epoch.append(images)
        views_all.append(views_epoch)
    return views_all


def teacher_channels(model) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


class PickleBomb:
    """An object whose unpickling would run a shell command (creating `marker`): what a malicious
    .pt file holds. torch.save only records the call; nothing runs until someone unpickles it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------ Hugging Face and WebDataset copies
# Written with pyarrow and tarfile directly, in the exact layouts the Hub's copies have: a
# `datasets` Image column is a struct {bytes: binary, path: string}; the features (Image,
# ClassLabel with its names) are JSON in the schema's b"huggingface" metadata, as
# datasets.Features.arrow_schema writes them; zh-plus/tiny-imagenet's files are
# data/train-00000-of-00001-<hash>.parquet and data/valid-00000-of-00001-<hash>.parquet with
# columns `image` and `label` (ClassLabel of the 200 sorted wnids); a save_to_disk folder holds
# dataset_dict.json and per split Arrow stream files, dataset_info.json and state.json; timm's
# WebDataset shards are <name>-<split>-NNNN.tar of <key>.jpg, <key>.cls (the class index as ASCII)
# and <key>.json.
HF_IMAGE_FEATURE = {"decode": True, "id": None, "_type": "Image"}


def hf_table(images: Sequence[bytes], paths: Sequence[str], labels: Sequence[int], names: Sequence[str] | None,
             image_column: str = "image", label_column: str = "label"):
    """A pyarrow table in the `datasets` layout (features in the schema metadata when `names`)."""
    import pyarrow as pa
    label_feature = ({"names": list(names), "id": None, "_type": "ClassLabel"} if names is not None
                     else {"dtype": "int64", "id": None, "_type": "Value"})
    metadata = {b"huggingface": json.dumps({"info": {"features": {image_column: HF_IMAGE_FEATURE,
                                                                   label_column: label_feature}}}).encode()}
    schema = pa.schema([(image_column, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        (label_column, pa.int64())], metadata=metadata)
    return pa.table({image_column: [{"bytes": b, "path": p} for b, p in zip(images, paths)],
                     label_column: list(labels)}, schema=schema)


def _tiny_folder_samples(folder_root: Path) -> dict[str, list[tuple[str, bytes, str]]]:
    """The folder fixture's images as (file name, JPEG bytes, wnid), train in the loader's order
    (sorted wnid, then file), valid in sorted file-name order (the loader's test order)."""
    base = Path(folder_root) / "tiny-imagenet-200"
    train = [(p.name, p.read_bytes(), wnid) for wnid in sorted(tiny_wnids())
             for p in sorted((base / "train" / wnid / "images").iterdir())]
    lines = [line.split("\t") for line in (base / "val" / "val_annotations.txt").read_text().splitlines()]
    valid = [(name, (base / "val" / "images" / name).read_bytes(), wnid) for name, wnid, *_ in sorted(lines)]
    return {"train": train, "valid": valid}


def make_tiny_imagenet_parquet(root: Path, folder_root: Path, names: Sequence[str] | None = None,
                               with_names: bool = True, row_group_size: int = 64) -> Path:
    """zh-plus/tiny-imagenet's layout from the folder fixture's JPEGs (the same bytes): labels are
    indices into `names` (default: the sorted wnids, as the Hub copy has them)."""
    import pyarrow.parquet as pq
    names = list(names) if names is not None else sorted(tiny_wnids())
    for split, samples in _tiny_folder_samples(folder_root).items():
        table = hf_table([s[1] for s in samples], [s[0] for s in samples], [names.index(s[2]) for s in samples],
                         names if with_names else None)
        path = Path(root) / "data" / f"{split}-00000-of-00001-{'1359597a978bc4fa' if split == 'train' else '70d52db3c749a935'}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
    return Path(root)


def _add_member(tar, name: str, data: bytes) -> None:
    import tarfile
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def make_tiny_imagenet_webdataset(root: Path, folder_root: Path, per_shard: int = 150) -> Path:
    """timm-style WebDataset shards (tiny-imagenet-train-0000.tar ..., tiny-imagenet-val-0000.tar)
    of the folder fixture's JPEGs; .cls holds the sorted-wnid index."""
    import tarfile
    order = sorted(tiny_wnids())
    Path(root).mkdir(parents=True, exist_ok=True)
    for split, samples in _tiny_folder_samples(folder_root).items():
        tag = "train" if split == "train" else "val"
        for k, start in enumerate(range(0, len(samples), per_shard)):
            with tarfile.open(Path(root) / f"tiny-imagenet-{tag}-{k:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data, wnid in samples[start:start + per_shard]:
                    key = name.rsplit(".", 1)[0]
                    _add_member(tar, f"{key}.jpg", data)
                    _add_member(tar, f"{key}.cls", str(order.index(wnid)).encode())
                    _add_member(tar, f"{key}.json", json.dumps({"filename": name, "class_name": wnid}).encode())
    return Path(root)


def make_cifar10_save_to_disk(root: Path, per_class: int = 3, test_per_class: int = 1) -> Path:
    """A `save_to_disk` DatasetDict of CIFAR-10 as the Hub's uoft-cs/cifar10 holds it (columns
    `img` and `label`, ClassLabel names in the official order), the pixels of make_cifar10 (PNG)."""
    import pyarrow as pa
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split, count in (("train", per_class), ("test", test_per_class)):
        labels = _interleaved_labels(10, count)
        encoded = []
        for image in _rgb_images(labels, 32):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        table = hf_table(encoded, [f"{split}_{i}.png" for i in range(len(labels))], labels, CIFAR10_NAMES,
                         image_column="img")
        folder = Path(root) / split
        folder.mkdir()
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=7)
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                       "_split": split}))
    return Path(root)
