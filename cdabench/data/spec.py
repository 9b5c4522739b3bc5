"""What a dataset is, apart from how it is loaded: its spec (layout, size, normalisation, loader)
and the shape every loader returns. Both the loaders (layouts.py) and the registry name these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .images import ImageSplit

Loaded = tuple[ImageSplit, ImageSplit, list[str]]  # (train, test, classes)


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset looks like on disk and how its pixels are normalised."""

    name: str
    layout: str  # official on-disk layout expected under --data-root (shown in errors)
    image_size: int  # default working size in pixels
    channels: int
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    # True: stored images already have the working size. False: photos of any
    # size, evaluated with Resize(size * 256 / 224) + CenterCrop(size).
    fixed_size: bool
    needs_root: bool
    # (root, spec, image_size) -> (train, test, classes)
    loader: Callable[[Path | None, DatasetSpec, int], Loaded] = field(repr=False, compare=False)
    # Hugging Face / WebDataset copies under --data-root (data/copies.py): the class order their
    # labels must follow, "sorted" (class names in sorted order) or "imagenet-1k" (the standard
    # 0-999 order); None: no copies of this dataset are read.
    copy_order: str | None = None
