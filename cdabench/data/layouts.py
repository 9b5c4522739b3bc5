"""Loaders for the official on-disk layouts of each supported dataset.

Every loader has the signature (root, spec, image_size) -> (train, test,
classes) and never downloads anything: a missing or malformed layout is a
DataError that repeats the expected layout (`spec.layout`).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .images import ImageSplit, is_image_file, list_class_folders, load_imagefolder, resize_uint8
from .spec import DatasetSpec, Loaded


def layout_error(spec: DatasetSpec, problem: str) -> DataError:
    """A DataError naming the problem and the layout that was expected."""
    return DataError(f"{spec.name}: {problem}. Expected layout under --data-root: {spec.layout}")


def _require_root(root: Path | None, spec: DatasetSpec) -> Path:
    if root is None:
        raise layout_error(spec, "--data-root is required for this dataset")
    return root


def _array_split(images: np.ndarray, labels: np.ndarray, image_size: int) -> ImageSplit:
    # Fixed-size datasets are resized once here so that stored images always
    # have the working size (what `fixed_size=True` promises to callers).
    return ImageSplit.from_array(resize_uint8(images, image_size), labels)


# --------------------------------------------------------------------- digits
def load_digits_split(root: Path | None, spec: DatasetSpec, image_size: int) -> Loaded:
    """scikit-learn's bundled 8x8 digits with a seeded stratified 80/20 split."""
    # Imported lazily: scikit-learn is only needed for this dataset.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn, never downloads
    images = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    # There is no official split; this one is fixed by random_state=0. Indices
    # are sorted so each split keeps scikit-learn's sample order.
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train = _array_split(images[train_idx], labels[train_idx], image_size)
    test = _array_split(images[test_idx], labels[test_idx], image_size)
    return train, test, [str(d) for d in range(10)]


# ---------------------------------------------------------------------- CIFAR
@dataclass(frozen=True)
class CifarFormat:
    """File names and pickle keys of one CIFAR python release."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str


CIFAR10 = CifarFormat(
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
)
CIFAR100 = CifarFormat(
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
)


# Every global an official CIFAR pickle names: numpy's array reconstruction (its module is
# numpy.core in the files, numpy._core in pickles written by numpy >= 2), ndarray and dtype.
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]
CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's pickles without running code: a pickle can call any importable function
    (os.system, open, ...), so only the numpy array types those files hold may be named."""

    def find_class(self, module: str, name: str):
        try:
            return CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which no official CIFAR file holds (allowed: numpy arrays "
                "and dtypes); refused without running it"
            ) from None


def _unpickle(path: Path, spec: DatasetSpec) -> dict:
    # The official CIFAR release is a set of Python pickles; latin1 is how
    # Python 3 reads their Python 2 strings (the same as torchvision).
    try:
        with open(path, "rb") as f:
            raw = CifarUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError,
            TypeError, IndexError, KeyError) as exc:
        raise layout_error(
            spec, f"cannot read {path} ({type(exc).__name__}: {exc}); re-extract the official archive"
        ) from exc
    if not isinstance(raw, dict):
        raise layout_error(spec, f"{path} is not a CIFAR batch (expected a pickled dict)")

    def text(value):
        return value.decode("latin1") if isinstance(value, bytes) else value

    # Normalise bytes keys/names so files pickled either way read the same.
    return {
        text(k): [text(x) for x in v] if isinstance(v, list) else v for k, v in raw.items()
    }


def _cifar_batch(path: Path, fmt: CifarFormat, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, spec)
    if "data" not in batch or fmt.label_key not in batch:
        raise layout_error(spec, f"{path} lacks the 'data' / '{fmt.label_key}' entries of a CIFAR batch")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[fmt.label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise layout_error(
            spec, f"{path} has data of shape {data.shape} for {len(labels)} labels, expected (N, 3072)"
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B) -> (N, 32, 32, 3).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar(root: Path | None, spec: DatasetSpec, image_size: int, fmt: CifarFormat) -> Loaded:
    root = _require_root(root, spec)
    # Accept --data-root pointing at the release folder itself or at its parent.
    candidates = [root / fmt.folder, root]
    base = next((c for c in candidates if (c / fmt.meta_file).is_file()), None)
    if base is None:
        raise layout_error(spec, f"no {fmt.folder}/{fmt.meta_file} found in {root}")
    needed = [*fmt.train_files, fmt.test_file]
    missing = [name for name in needed if not (base / name).is_file()]
    if missing:
        raise layout_error(spec, f"{base} is missing {', '.join(missing)}")

    classes = list(_unpickle(base / fmt.meta_file, spec).get(fmt.names_key, []))
    if not classes:
        raise layout_error(spec, f"{base / fmt.meta_file} has no '{fmt.names_key}' list")
    parts = [_cifar_batch(base / name, fmt, spec) for name in fmt.train_files]
    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    test_x, test_y = _cifar_batch(base / fmt.test_file, fmt, spec)
    for labels in (train_y, test_y):
        if len(labels) and labels.max() >= len(classes):
            raise layout_error(spec, f"labels in {base} exceed the {len(classes)} class names")
    return (
        _array_split(train_x, train_y, image_size),
        _array_split(test_x, test_y, image_size),
        classes,
    )


def load_cifar10(root: Path | None, spec: DatasetSpec, image_size: int) -> Loaded:
    return load_cifar(root, spec, image_size, CIFAR10)


def load_cifar100(root: Path | None, spec: DatasetSpec, image_size: int) -> Loaded:
    return load_cifar(root, spec, image_size, CIFAR100)


# ---------------------------------------------------------------------- MNIST
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_bytes(path: Path, spec: DatasetSpec) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise layout_error(
            spec, f"cannot read {path} ({type(exc).__name__}: {exc}); the file is truncated or corrupt, "
            "re-download it"
        ) from exc


def parse_idx(path: Path, magic: int, spec: DatasetSpec) -> np.ndarray:
    """Parse an unsigned-byte IDX file (big-endian header) into an array."""
    data = _read_bytes(path, spec)
    if len(data) < 4:
        raise layout_error(spec, f"{path} is truncated ({len(data)} bytes); re-download it")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise layout_error(spec, f"{path} has IDX magic {found}, expected {magic}; replace the file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise layout_error(spec, f"{path} is truncated inside its header; re-download it")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = int(np.prod(dims))
    payload = len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "longer than its header says"
        raise layout_error(
            spec, f"{path} is {problem}: header dims {dims} need {expected} bytes, found {payload}; re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_like(
    root: Path | None, spec: DatasetSpec, image_size: int, torch_folder: str, classes: list[str]
) -> Loaded:
    root = _require_root(root, spec)
    # The bare files, the '<root>/raw' folder, or torchvision's '<root>/<Name>/raw'.
    folders = [root, root / "raw", root / torch_folder / "raw"]
    for folder in folders:
        files = {key: _find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}
        if all(files.values()):
            break
    else:
        looked = ", ".join(str(f) for f in folders)
        raise layout_error(spec, f"the four IDX files (optionally .gz) were not all found in any of: {looked}")

    def split(images_key: str, labels_key: str) -> ImageSplit:
        images = parse_idx(files[images_key], IDX_IMAGES_MAGIC, spec)
        labels = parse_idx(files[labels_key], IDX_LABELS_MAGIC, spec).astype(np.int64)
        if len(images) != len(labels):
            raise layout_error(
                spec, f"{files[images_key]} holds {len(images)} images but {files[labels_key]} holds "
                f"{len(labels)} labels; re-download both"
            )
        if len(labels) and labels.max() >= len(classes):
            raise layout_error(spec, f"{files[labels_key]} has a label >= {len(classes)}")
        return _array_split(images[..., None], labels, image_size)

    return split("train_images", "train_labels"), split("test_images", "test_labels"), list(classes)


def load_mnist(root: Path | None, spec: DatasetSpec, image_size: int) -> Loaded:
    return load_mnist_like(root, spec, image_size, "MNIST", [str(d) for d in range(10)])


def load_fashion_mnist(root: Path | None, spec: DatasetSpec, image_size: int) -> Loaded:
    return load_mnist_like(root, spec, image_size, "FashionMNIST", FASHION_MNIST_CLASSES)


# -------------------------------------------------------------- Tiny ImageNet
TINY_NATIVE_SIZE = 64


def load_tiny_imagenet(root: Path | None, spec: DatasetSpec, image_size: int) -> Loaded:
    root = _require_root(root, spec)
    base = next(
        (c for c in (root / "tiny-imagenet-200", root) if (c / "wnids.txt").is_file()), None
    )
    if base is None:
        raise layout_error(spec, f"no tiny-imagenet-200/wnids.txt (or wnids.txt) found in {root}")
    listed = [line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip()]
    if len(set(listed)) != len(listed) or not listed:
        raise layout_error(spec, f"{base / 'wnids.txt'} is empty or lists a wnid twice")
    # Class order = sorted wnids, the field's convention (torchvision ImageFolder over train/, the
    # official Tiny training code, SRe2L/CDA, RDED); the archive's wnids.txt is not sorted, and
    # its line order would map an official teacher or released set onto the wrong classes.
    wnids = sorted(listed)
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    # Stored images are 64 px; decode at the working size when another was asked for.
    resize_to = None if image_size == TINY_NATIVE_SIZE else image_size

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise layout_error(spec, f"missing train folder {folder}")
        images = sorted(p for p in folder.iterdir() if is_image_file(p))
        if not images:
            raise layout_error(spec, f"train folder {folder} holds no images")
        train_paths.extend(images)
        train_labels.extend([label_of[wnid]] * len(images))

    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise layout_error(spec, f"missing {annotations}")
    val: list[tuple[str, int]] = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise layout_error(spec, f"{annotations} line {number} is not 'filename<TAB>wnid<TAB>...'")
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:
            raise layout_error(
                spec, f"{annotations} line {number} names wnid {wnid!r}, which is not in wnids.txt"
            )
        if not (base / "val" / "images" / filename).is_file():
            raise layout_error(
                spec, f"{annotations} line {number} names {base / 'val' / 'images' / filename}, which does not exist"
            )
        val.append((filename, label_of[wnid]))
    if not val:
        raise layout_error(spec, f"{annotations} lists no images")
    val.sort()

    train = ImageSplit.from_files(train_paths, train_labels, spec.channels, root=base, resize_to=resize_to)
    test = ImageSplit.from_files(
        [base / "val" / "images" / name for name, _ in val],
        [label for _, label in val],
        spec.channels,
        root=base,
        resize_to=resize_to,
    )
    return train, test, wnids


# -------------------------------------------------------- ImageFolder trees
VALPREP_HINT = (
    "the validation images must already be sorted into one folder per class "
    "(for ImageNet-1k run the usual valprep.sh script, which moves val/*.JPEG into val/<wnid>/)"
)


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def load_train_val_folders(
    root: Path | None,
    spec: DatasetSpec,
    image_size: int,
    train_names: tuple[str, ...] = ("train",),
    val_names: tuple[str, ...] = ("val",),
) -> Loaded:
    """root/train/<class>/* and root/val/<class>/* with the same class folders."""
    root = _require_root(root, spec)
    train_dir = _first_dir(root, train_names)
    val_dir = _first_dir(root, val_names)
    if train_dir is None or val_dir is None:
        missing = [names[0] for names, d in ((train_names, train_dir), (val_names, val_dir)) if d is None]
        raise layout_error(spec, f"{root} is missing {' and '.join(m + '/' for m in missing)}")

    train, classes = load_imagefolder(train_dir, spec.channels)
    val_folders = list_class_folders(val_dir)
    if not val_folders:
        flat = any(is_image_file(p) for p in val_dir.iterdir())
        problem = f"{val_dir} holds images directly" if flat else f"{val_dir} has no class folders"
        raise layout_error(spec, f"{problem}; {VALPREP_HINT}")
    if set(val_folders) != set(classes):
        missing = sorted(set(classes) - set(val_folders))[:5]
        extra = sorted(set(val_folders) - set(classes))[:5]
        raise layout_error(
            spec,
            f"{val_dir} has {len(val_folders)} class folders but {train_dir} has {len(classes)}; "
            f"missing in val (up to 5): {missing}, not in train (up to 5): {extra}; "
            f"the val class folders must be the train ones, {VALPREP_HINT}",
        )
    test, _ = load_imagefolder(val_dir, spec.channels, classes)
    # Identify files relative to the data root ('train/...', 'val/...').
    train.root = test.root = root
    return train, test, classes


def load_imagenet21k(root: Path | None, spec: DatasetSpec, image_size: int) -> Loaded:
    # ImageNet-21K-P archives extract to imagenet21k_train / imagenet21k_val;
    # accept those names as well as train / val.
    return load_train_val_folders(
        root, spec, image_size, ("train", "imagenet21k_train"), ("val", "imagenet21k_val")
    )
