"""The supported datasets: their official layouts, sizes, normalisation and loaders."""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

from cdabench import artifacts

from . import copies, layouts
from .errors import DataError
from .images import ImageSplit
from .spec import DatasetSpec

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The constants of the official SRe2L CIFAR-100 scripts (squeeze_cifar.py, recover, relabel),
# copied from kuangliu/pytorch-cifar's CIFAR-10 recipe, which SRe2L adapted: CIFAR-10's train
# mean with that recipe's std (CIFAR-10's pixel std is 0.2470, 0.2435, 0.2616). Recover works in the
# normalised space, so these set its start noise, clamp box and step size: use them for both.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class RealData:
    """One loaded dataset: the official train and test splits and their classes."""

    spec: DatasetSpec
    image_size: int
    classes: list[str]  # index = label; the fixed, recorded order
    train: ImageSplit
    test: ImageSplit
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self, cache: Path | None = None) -> str:
        """sha256 hex identifying exactly which real data was loaded.

        Covers the name, working size, classes and, per split, every sample's
        identity (relative path + byte size for files, raw bytes for arrays)
        and target. Files are only stat'ed; the result is kept, since every
        stage's cache key asks for it (1.28 M stat calls on ImageNet).

        `cache`: a folder where file-backed data keeps its fingerprint under the
        key of one directory scan (`listing_key`): later runs, ranks and workers
        read it instead of a stat of every file.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        stored = Path(cache) / f"{self.listing_key()}.txt" if cache is not None and self.train.file_backed else None
        value = stored.read_text().strip() if stored is not None and stored.is_file() else ""
        if not _HEX64.match(value):
            value = self._hash(lambda split, hasher: split.update_hash(hasher))
            if stored is not None:
                artifacts.atomic_write_bytes(stored, value.encode())
        self._fingerprint = value
        return self._fingerprint

    def listing_key(self) -> str:
        """sha256 hex of what one scan of the dataset's directories sees (ImageSplit.update_listing_hash)."""
        return self._hash(lambda split, hasher: split.update_listing_hash(hasher))

    def _hash(self, feed) -> str:
        hasher = hashlib.sha256()
        header = {"name": self.spec.name, "image_size": self.image_size, "classes": self.classes}
        hasher.update(json.dumps(header, sort_keys=True).encode())
        for split_name, split in (("train", self.train), ("test", self.test)):
            hasher.update(f"\n{split_name}\n".encode())
            feed(split, hasher)
        return hasher.hexdigest()


_IMAGEFOLDER_TREES = (
    "<root>/train/<class>/<image files> and <root>/val/<class>/<image files>, with the same class "
    "folders in both (validation images already sorted into class folders)"
)

DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to the registry (create_dataset is the one factory); a name already
    registered is refused."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered ({DATASETS[spec.name].layout[:60]}...): "
                         "pick another name")
    DATASETS[spec.name] = spec
    return spec


for _spec in (
    DatasetSpec(
        name="digits",
        layout=(
            "nothing: scikit-learn's bundled load_digits() (1797 8x8 images, classes '0'..'9') "
            "with a fixed stratified 80/20 train/test split (random_state=0); --data-root is ignored"
        ),
        image_size=8,
        channels=1,
        # Pixel mean/std of the 1437 train images scaled to [0, 1] at 8 px,
        # computed once with numpy and rounded to 4 decimals.
        mean=(0.3054,),
        std=(0.3760,),
        fixed_size=True,
        needs_root=False,
        loader=layouts.load_digits_split,
    ),
    DatasetSpec(
        name="cifar10",
        layout=(
            "<root>/cifar-10-batches-py/ (or --data-root pointing at that folder) holding the python "
            "pickles data_batch_1 .. data_batch_5, test_batch and batches.meta, as extracted from "
            "cifar-10-python.tar.gz"
        ),
        image_size=32,
        channels=3,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        fixed_size=True,
        needs_root=True,
        loader=layouts.load_cifar10,
        copy_order="sorted",
    ),
    DatasetSpec(
        name="cifar100",
        layout=(
            "<root>/cifar-100-python/ (or --data-root pointing at that folder) holding the python "
            "pickles train, test and meta, as extracted from cifar-100-python.tar.gz"
        ),
        image_size=32,
        channels=3,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        fixed_size=True,
        needs_root=True,
        loader=layouts.load_cifar100,
        copy_order="sorted",
    ),
    DatasetSpec(
        name="mnist",
        layout=(
            "the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
            "and t10k-labels-idx1-ubyte (each may be gzipped, name + '.gz') directly in <root>, in "
            "<root>/raw, or in <root>/MNIST/raw (torchvision's layout)"
        ),
        image_size=28,
        channels=1,
        mean=(0.1307,),
        std=(0.3081,),
        fixed_size=True,
        needs_root=True,
        loader=layouts.load_mnist,
    ),
    DatasetSpec(
        name="fashion-mnist",
        layout=(
            "the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
            "and t10k-labels-idx1-ubyte (each may be gzipped, name + '.gz') directly in <root>, in "
            "<root>/raw, or in <root>/FashionMNIST/raw (torchvision's layout)"
        ),
        image_size=28,
        channels=1,
        mean=(0.2860,),
        std=(0.3530,),
        fixed_size=True,
        needs_root=True,
        loader=layouts.load_fashion_mnist,
    ),
    DatasetSpec(
        name="tiny-imagenet",
        layout=(
            "<root>/tiny-imagenet-200/ (or --data-root pointing at that folder) as extracted from "
            "tiny-imagenet-200.zip: wnids.txt (the 200 wnids; classes are numbered in sorted wnid order, not "
            "the file's line order), "
            "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt "
            "(tab-separated: filename, wnid, bounding box)"
        ),
        image_size=64,
        channels=3,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        fixed_size=True,
        needs_root=True,
        loader=layouts.load_tiny_imagenet,
        copy_order="sorted",
    ),
    DatasetSpec(
        name="imagenet-1k",
        layout=(
            "ImageFolder trees <root>/train/<wnid>/*.JPEG (1000 class folders) and "
            "<root>/val/<wnid>/*.JPEG with the same class folders; the 50,000 validation images "
            "must already be moved into class folders (e.g. with the usual valprep.sh script)"
        ),
        image_size=224,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        fixed_size=False,
        needs_root=True,
        loader=layouts.load_train_val_folders,
        copy_order="imagenet-1k",
    ),
    DatasetSpec(
        name="imagenet-21k",
        layout=(
            "ImageNet-21K-P as ImageFolder trees " + _IMAGEFOLDER_TREES
            + " (the release's imagenet21k_train / imagenet21k_val folder names are accepted too)"
        ),
        image_size=224,
        channels=3,
        # ImageNet-21K-P models take [0, 1] inputs without normalisation.
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        fixed_size=False,
        needs_root=True,
        loader=layouts.load_imagenet21k,
    ),
    DatasetSpec(
        name="imagefolder",
        layout="any ImageFolder trees " + _IMAGEFOLDER_TREES + "; classes are the sorted train folder names",
        image_size=224,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        fixed_size=False,
        needs_root=True,
        loader=layouts.load_train_val_folders,
        copy_order="sorted",
    ),
):
    register_dataset(_spec)


def list_datasets() -> list[str]:
    """Names accepted by create_dataset, in registry order."""
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The spec for `name` (case-insensitive, '_' accepted for '-')."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")
    return DATASETS[key]


def create_dataset(name: str, root: str | Path | None = None, image_size: int | None = None,
                   cache: str | Path | None = None) -> RealData:
    """Load the official train and test splits of dataset `name` from `root` (never downloads): its
    official layout, or a Hugging Face / WebDataset copy found there (data/copies.py; `cache`: where
    a WebDataset copy's shard indexes are kept)."""
    spec = get_spec(name)
    if spec.needs_root:
        if root is None:
            raise DataError(
                f"{spec.name}: --data-root is required for this dataset (nothing is downloaded). "
                f"Expected layout under --data-root: {spec.layout}"
            )
        if not Path(root).expanduser().is_dir():
            raise DataError(
                f"{spec.name}: data root {root} does not exist or is not a directory. "
                f"Expected layout under --data-root: {spec.layout}"
            )
    size = spec.image_size if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise DataError(f"image_size must be a positive integer number of pixels, got {image_size!r}")
    path = Path(root).expanduser() if root is not None else None
    copy = copies.detect(path) if path is not None and spec.needs_root else None
    if copy is not None:
        index_cache = Path(cache) / "copy-index" if cache is not None else None
        train, test, classes = copies.load_copy(path, copy, spec, int(size), index_cache)
    else:
        train, test, classes = spec.loader(path, spec, int(size))
    return RealData(spec=spec, image_size=int(size), classes=list(classes), train=train, test=test)
