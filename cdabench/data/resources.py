"""Disk and memory a stage needs, checked before it starts: the estimate is printed, and a stage
that cannot fit is refused with the sizes and the fix, before anything is written."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from cdabench import progress

from .errors import DataError

# Bytes per pixel value of an encoded image, an upper estimate: PNG of synthetic (noise-like)
# images barely compresses; JPEG at quality 75 of the same, about a quarter of the raw bytes.
ENCODED_FRACTION = {"png": 1.0, "jpeg75": 0.25}


def check_free_space(folder: Path, needed: int, what: str, fix: str) -> None:
    """Refuse before writing `needed` bytes under `folder` when the disk has less free (with 5 %
    headroom), naming the sizes and `fix`."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * 1.05 > free:
        raise DataError(f"{what} needs {needed / 2**30:.1f} GiB but {probe} has {free / 2**30:.1f} GiB free: {fix}")


def available_memory() -> int | None:
    """Bytes of memory available now (None where the platform does not say)."""
    if not hasattr(os, "sysconf"):
        return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_free_memory(needed: int, what: str, fix: str) -> None:
    """Refuse before allocating `needed` bytes of host memory when less is available."""
    available = available_memory()
    if available is not None and needed > available:
        raise DataError(f"{what} holds {needed / 2**30:.1f} GiB in memory but {available / 2**30:.1f} GiB is "
                        f"available: {fix}")


def check_images_on_disk(folder: Path, images: int, shape: tuple[int, int, int], image_format: str,
                         what: str) -> int:
    """Print and check the disk `images` encoded images of `shape` (C, H, W) take under `folder`;
    returns the estimate in bytes."""
    needed = int(images * shape[0] * shape[1] * shape[2] * ENCODED_FRACTION.get(image_format, 1.0))
    progress.log(f"{what}: {images} images of {shape[0]}x{shape[1]}x{shape[2]} as {image_format}, "
                 f"about {needed / 2**30:.2f} GiB -> {folder}")
    check_free_space(folder, needed, what, "free disk space, or write --out on a larger disk")
    return needed
