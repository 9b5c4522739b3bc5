"""Real image splits (in-memory arrays or lazily decoded files) and ImageFolder trees."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DataError

# Lower-case suffixes accepted in ImageFolder trees (compared case-insensitively,
# so ImageNet's '.JPEG' counts).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
)

Transform = Callable[[torch.Tensor], torch.Tensor]

# Resizing whole arrays in chunks keeps the float32 copy small (CIFAR at 64 px
# would otherwise need several GB at once).
_RESIZE_CHUNK = 1024


def is_image_file(path: Path) -> bool:
    """True for a visible file whose suffix is a supported image extension.

    Dot-files are skipped because macOS leaves '._name.JPEG' resource forks
    next to real images and they cannot be decoded.
    """
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize uint8 images (N, H, W, C) to (N, size, size, C).

    Works on [0, 1] floats and rounds back to uint8. align_corners=False; the
    antialias filter is only used when shrinking (it has no effect when
    enlarging, e.g. digits 8 -> 16 px, so that path matches a plain bilinear
    upsample with antialias=False).
    """
    if images.ndim != 4:
        raise DataError(f"resize_uint8 expects (N, H, W, C) images, got shape {images.shape}")
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = torch.from_numpy(images[start : start + _RESIZE_CHUNK]).permute(0, 3, 1, 2)
        out[start : start + _RESIZE_CHUNK] = (
            _resize_tensor(chunk, size).permute(0, 2, 3, 1).numpy()
        )
    return out


def _resize_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (N, C, H, W) tensor to (N, C, size, size) uint8."""
    shrinking = size < images.shape[-1] or size < images.shape[-2]
    resized = F.interpolate(
        images.float() / 255.0,
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=shrinking,
    )
    return (resized * 255.0).round().clamp(0, 255).to(torch.uint8)


def _as_targets(targets: Iterable[int] | np.ndarray, n: int) -> np.ndarray:
    array = np.asarray(targets)
    if array.ndim != 1 or len(array) != n:
        raise DataError(
            f"expected {n} integer targets (one per image), got shape {array.shape}; "
            "pass exactly one label per image"
        )
    if len(array) and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"targets must be integers, got dtype {array.dtype}; pass class indices")
    if len(array) and array.min() < 0:
        raise DataError("targets must be non-negative class indices; found a negative label")
    return array.astype(np.int64)


class ImageSplit(torch.utils.data.Dataset):
    """Real images with integer labels, decoded lazily.

    Backed by a uint8 array (N, H, W, C) held in memory, by a list of image
    files, or by encoded images inside container files (a parquet / Arrow /
    tar copy: data/containers.py), the last two decoded with PIL on access.
    Items are uint8 tensors (C, H, W) at the stored size (or at `resize_to`
    when set), passed through `transform` if one is set. Build instances with
    `from_array`, `from_files` or `from_encoded`.
    """

    def __init__(
        self,
        *,
        targets: np.ndarray,
        channels: int,
        images: np.ndarray | None = None,
        paths: list[Path] | None = None,
        encoded=None,
        root: Path | None = None,
        resize_to: int | None = None,
        transform: Transform | None = None,
    ) -> None:
        if sum(x is not None for x in (images, paths, encoded)) != 1:
            raise DataError("ImageSplit needs exactly one of images=, paths= or encoded=; use from_array, from_files "
                            "or from_encoded")
        self.targets = targets
        self.channels = channels
        self.transform = transform
        self.resize_to = resize_to
        # Root that file paths are identified relative to (fingerprints must not
        # depend on where the data root is mounted).
        self.root = root
        self._images = images
        self._paths = paths
        self._encoded = encoded

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_array(cls, images: np.ndarray, targets: Iterable[int] | np.ndarray) -> "ImageSplit":
        """Wrap uint8 images shaped (N, H, W, C) or (N, H, W) (one channel).

        A C-contiguous array is wrapped without copying (CIFAR-sized arrays
        are not duplicated); items and load_all always return copies.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8 in 0..255, got dtype {images.dtype}; convert them first")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise DataError(
                f"images must be shaped (N, H, W, C) or (N, H, W), got {images.shape}; reshape them first"
            )
        return cls(
            targets=_as_targets(targets, len(images)),
            channels=int(images.shape[-1]),
            images=np.ascontiguousarray(images),
        )

    @classmethod
    def from_files(
        cls,
        paths: Sequence[Path | str],
        targets: Iterable[int] | np.ndarray,
        channels: int,
        *,
        root: Path | None = None,
        resize_to: int | None = None,
    ) -> "ImageSplit":
        """Image files decoded on access and converted to 'L' (1 ch) or 'RGB' (3 ch).

        root: directory the paths are identified relative to in fingerprints
        (default: their common parent directory). resize_to: decode each image
        at this square size (used for fixed-size datasets loaded at another
        working size).
        """
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        path_list = [Path(p) for p in paths]
        return cls(
            targets=_as_targets(targets, len(path_list)),
            channels=channels,
            paths=path_list,
            root=Path(root) if root is not None else None,
            resize_to=resize_to,
        )

    @classmethod
    def from_encoded(
        cls,
        encoded,
        targets: Iterable[int] | np.ndarray,
        channels: int,
        *,
        root: Path | None = None,
        resize_to: int | None = None,
    ) -> "ImageSplit":
        """Encoded images inside container files (data/containers.py: EncodedImages), decoded on
        access like files; `root`: the data root their shards are identified relative to."""
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        return cls(targets=_as_targets(targets, len(encoded)), channels=channels, encoded=encoded,
                   root=Path(root) if root is not None else None, resize_to=resize_to)

    # ------------------------------------------------------------- accessors
    @property
    def paths(self) -> list[Path] | None:
        """The image files, or None for an in-memory split or a copy's container files."""
        return self._paths

    @property
    def encoded(self):
        """The container-backed images (EncodedImages), or None."""
        return self._encoded

    def stored_bytes(self) -> int | None:
        """Bytes of the stored (encoded) images: files' sizes, a copy's shares of its shards; None in memory."""
        if self._paths is not None:
            return sum(p.stat().st_size for p in self._paths)
        return self._encoded.stored_bytes() if self._encoded is not None else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self._decode(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])

    def _decode(self, i: int) -> torch.Tensor:
        if self._images is not None:
            # A real copy: callers may modify the tensor in place without touching
            # the dataset (a permuted one-channel view would still share memory).
            image = torch.from_numpy(self._images[i].transpose(2, 0, 1).copy())
        elif self._encoded is not None:
            image = self._decode_file(io.BytesIO(self._encoded.read(i)), self._encoded.where(i))
        else:
            image = self._decode_file(self._paths[i])
        if self.resize_to is not None:
            image = _resize_tensor(image[None], self.resize_to)[0]
        return image

    def _decode_file(self, path, where: str | None = None) -> torch.Tensor:
        """Decode an image file, or an encoded image's bytes (a file object; `where` names it)."""
        mode = "L" if self.channels == 1 else "RGB"
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert(mode))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # SyntaxError: some PIL plugins raise it on malformed headers.
            raise DataError(
                f"cannot decode image {where or f'file {path}'} ({type(exc).__name__}: {exc}); "
                "remove or replace it (re-extract it from the official archive, or re-download the copy)"
            ) from exc
        if array.ndim == 2:
            array = array[..., None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    # ----------------------------------------------------------- derivations
    def _replace(self, **changes) -> "ImageSplit":
        clone = copy.copy(self)
        for key, value in changes.items():
            setattr(clone, key, value)
        return clone

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSplit":
        """A new split with the given items (in the given order); keeps the transform."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"subset index out of range for a split of {len(self)} images")
        changes = {"targets": self.targets[idx].copy()}
        if self._images is not None:
            changes["_images"] = self._images[idx]
        elif self._encoded is not None:
            changes["_encoded"] = self._encoded.subset(idx)
        else:
            changes["_paths"] = [self._paths[j] for j in idx]
        return self._replace(**changes)

    def with_transform(self, transform: Transform | None) -> "ImageSplit":
        """A copy whose items are passed through `transform` (a callable on uint8 tensors)."""
        return self._replace(transform=transform)

    def load_all(self) -> torch.Tensor:
        """Every image (after the transform) stacked into one uint8 tensor (N, C, H, W)."""
        if self._images is not None and self.transform is None and self.resize_to is None:
            return torch.from_numpy(self._images.transpose(0, 3, 1, 2).copy())
        images = [self[i][0] for i in range(len(self))]
        if not images:
            raise DataError("load_all on an empty split; check the split is not empty before loading")
        first = images[0]
        for i, image in enumerate(images):
            if image.dtype != torch.uint8:
                raise DataError(
                    f"load_all needs uint8 images, item {i} has dtype {image.dtype}; "
                    "use a transform that keeps uint8 (convert to float after stacking)"
                )
            if image.shape != first.shape:
                where = f" ({self._paths[i]})" if self._paths is not None else ""
                raise DataError(
                    f"load_all needs images of one size: item 0 is {tuple(first.shape)} but item {i}"
                    f"{where} is {tuple(image.shape)}; set a resizing transform with with_transform first"
                )
        return torch.stack(images)

    # ------------------------------------------------------------ identity
    def update_hash(self, hasher: "hashlib._Hash") -> None:
        """Feed this split's per-sample identity and targets into `hasher`.

        Files: path relative to `root` and size in bytes (one stat per file, no
        reads, so it stays cheap for ImageNet). Arrays: shape and raw bytes.
        """
        if self._images is not None:
            hasher.update(f"array{self._images.shape}".encode())
            hasher.update(np.ascontiguousarray(self._images).reshape(-1).data)
        elif self._encoded is not None:
            self._encoded.update_identity(hasher)
        else:
            root = self.root
            if root is None:
                root = Path(os.path.commonpath([str(p.parent) for p in self._paths])) if self._paths else Path(".")
            lines = []
            for path in self._paths:
                try:
                    size = path.stat().st_size
                except OSError as exc:
                    raise DataError(
                        f"cannot stat image file {path} ({exc}); restore the file or reload the dataset"
                    ) from exc
                lines.append(f"{Path(os.path.relpath(path, root)).as_posix()}\t{size}\n")
            hasher.update(f"files{len(lines)}\n".encode())
            hasher.update("".join(lines).encode())
        hasher.update(f"resize{self.resize_to}".encode())
        hasher.update(self.targets.astype("<i8").tobytes())

    @property
    def file_backed(self) -> bool:
        return self._images is None

    def update_listing_hash(self, hasher: "hashlib._Hash") -> None:
        """Feed what one directory scan sees into `hasher`: every file's path (as listed when the
        split was loaded) and target, and each directory's modification time (one stat per
        directory: 1,000 on ImageNet rather than 1.28 M). Adding, removing, renaming or replacing
        a file (a new file moved into place) changes a directory's mtime; a file's bytes edited in
        place do not (README, "Data at scale"). A copy's shards: their paths, sizes and
        modification times (one stat each: 1,024 shards on ImageNet)."""
        if self._encoded is not None:
            self._encoded.update_identity(hasher, mtimes=True)
            hasher.update(f"resize{self.resize_to}".encode())
            hasher.update(self.targets.astype("<i8").tobytes())
            return
        folders = sorted({p.parent for p in self._paths})
        hasher.update("\n".join(p.as_posix() for p in self._paths).encode())
        for folder in folders:
            try:
                mtime = folder.stat().st_mtime_ns
            except OSError as exc:
                raise DataError(f"cannot stat image folder {folder} ({exc}); restore it or reload the dataset") from exc
            hasher.update(f"\n{folder.as_posix()}\t{mtime}".encode())
        hasher.update(f"resize{self.resize_to}".encode())
        hasher.update(self.targets.astype("<i8").tobytes())


# ----------------------------------------------------------------- ImageFolder
_TRAILING_INT = re.compile(r"(\d+)$")


def list_class_folders(root: Path) -> list[str]:
    """Sorted names of the visible sub-directories of `root`."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    """Image files anywhere under `folder` (like torchvision's ImageFolder), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in filenames if is_image_file(Path(name)))
    return sorted(found)


def _map_folders(root: Path, folders: list[str], classes: list[str]) -> dict[str, int]:
    """Map folder names onto class indices: by name, else by trailing integer, else refuse."""
    if len(set(classes)) != len(classes):
        raise DataError("class names must be unique; the given class list has duplicates")
    if set(folders) == set(classes):
        index = {name: i for i, name in enumerate(classes)}
        return {folder: index[folder] for folder in folders}

    # Official SRe2L / CDA releases name class folders 'new000'..'new999' by index.
    numbers = {}
    for folder in folders:
        match = _TRAILING_INT.search(folder)
        if match is None:
            break
        numbers[folder] = int(match.group(1))
    else:
        if len(folders) == len(classes) and sorted(numbers.values()) == list(range(len(classes))):
            return numbers

    unmatched = sorted(set(folders) - set(classes))[:5]
    raise DataError(
        f"cannot map the {len(folders)} class folders in {root} onto the {len(classes)} expected classes; "
        f"unmatched folder names (up to 5): {unmatched}. Fix: name the folders exactly as the class names "
        f"(e.g. {classes[:3]}) or by class index with a trailing integer 0..{len(classes) - 1} "
        "(e.g. 'new000', 'new001', ...), one folder per class"
    )


def load_imagefolder(
    root: Path | str, channels: int, classes: list[str] | None = None
) -> tuple[ImageSplit, list[str]]:
    """Load any ImageFolder tree root/<class>/<image files>.

    classes=None: classes are the sorted folder names. classes given: folders
    are mapped by name, or by a trailing integer 0..len(classes)-1 ('new000').
    Returns (split, class names in label order); images are ordered by label,
    then by sorted path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist or is not a directory; "
            "expected root/<class>/<image files>"
        )
    folders = list_class_folders(root)
    if not folders:
        raise DataError(
            f"no class folders found in {root}; expected one sub-folder per class holding its images "
            "(root/<class>/<image files>)"
        )
    if classes is None:
        class_names = folders
        mapping = {name: i for i, name in enumerate(folders)}
    else:
        class_names = list(classes)
        mapping = _map_folders(root, folders, class_names)

    paths: list[Path] = []
    targets: list[int] = []
    for folder in sorted(folders, key=lambda f: mapping[f]):
        images = list_images(root / folder)
        if not images:
            raise DataError(
                f"class folder {root / folder} contains no images (looked for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add its images or remove the folder"
            )
        paths.extend(images)
        targets.extend([mapping[folder]] * len(images))
    split = ImageSplit.from_files(paths, np.asarray(targets, dtype=np.int64), channels, root=root)
    return split, class_names
