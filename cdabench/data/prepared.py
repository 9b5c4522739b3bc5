"""The prepared cache: a split's working-size view (the resize + centre crop every stage uses,
`Context.source`), decoded from the original files once, in parallel, into one uint8 array
(N, C, S, S) stored as a .npy file and memory-mapped afterwards, so teacher training, `full`,
herding, the class-order probe and evaluation read at memory speed on every rank and in every
worker. Training-time random crops still happen on the device, on these working-size images.

The folder holds images.npy, targets.npy and meta.json (written last, atomically: a folder
without it is unfinished and rebuilt); one process builds it while the others wait on a lock file. meta.json keeps the split's fingerprint
(`split_fingerprint`: every file's relative path, size and modification time, the targets and the
view); a cache whose fingerprint differs from the split's current one is never used."""
from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cdabench import artifacts, progress

from .containers import file_identity_line
from .errors import DataError
from .resources import check_free_space
from .images import ImageSplit

FORMAT_VERSION = 1
META = "meta.json"


def split_fingerprint(split: ImageSplit, view: str) -> str:
    """sha256 of what the prepared view depends on: per file its path (relative to the split's
    root), size and modification time (one stat each, no reads; a rewritten file changes it even
    at the same size), or an in-memory split's bytes; the targets; and `view`, a description of
    the working-size transform."""
    hasher = hashlib.sha256(f"prepared-v{FORMAT_VERSION}\n{view}\n".encode())
    if split.encoded is not None:   # a copy's container files: each shard's path, size and time
        split.encoded.update_identity(hasher, mtimes=True)
        hasher.update(f"resize{split.resize_to}".encode())
        hasher.update(np.asarray(split.targets).astype("<i8").tobytes())
        return hasher.hexdigest()
    if split.paths is None:
        split.update_hash(hasher)
        return hasher.hexdigest()
    root = split.root or Path(os.path.commonpath([str(p.parent) for p in split.paths]))
    hasher.update("".join(file_identity_line(path, root) for path in split.paths).encode())
    hasher.update(f"resize{split.resize_to}".encode())
    hasher.update(np.asarray(split.targets).astype("<i8").tobytes())
    return hasher.hexdigest()


def prepared_bytes(n: int, shape: tuple[int, int, int]) -> int:
    return n * int(np.prod(shape))


def _fill(part: ImageSplit, path: str, start: int) -> int:
    """Decode the images of `part` into rows start.. of the array at `path` (run in a worker
    process; `part` is a subset, so a worker is not sent the whole list of files)."""
    array = np.load(path, mmap_mode="r+")
    for i in range(len(part)):
        array[start + i] = part[i][0].numpy()
    array.flush()
    return len(part)


def build_prepared(split: ImageSplit, folder: Path, fingerprint: str, shape: tuple[int, int, int],
                   workers: int = 0, chunk: int = 512) -> dict:
    """Decode every image of `split` (whose transform yields uint8 `shape` tensors) into
    folder/images.npy, in `workers` spawned processes (0: here). Returns the meta written."""
    folder = Path(folder)
    n = len(split)
    check_free_space(folder, prepared_bytes(n, shape), f"the prepared cache of {n} images at {shape}",
                     "free disk space, or point --cache-dir / $CDABENCH_CACHE at a larger disk")
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=".images.", suffix=".npy.partial")
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, *shape))
        del array  # the header is written; workers open the file themselves
        ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        with progress.track(f"prepare {n} images", n) as bar:
            if workers > 1:
                import multiprocessing
                parts = (split.subset(np.arange(s, e)) for s, e in ranges)
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                    for done in pool.map(_fill, parts, [partial] * len(ranges), [s for s, _ in ranges]):
                        bar.advance(done)
            else:
                for s, e in ranges:
                    bar.advance(_fill(split.subset(np.arange(s, e)), partial, s))
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        buf = _npy_bytes(np.asarray(split.targets, dtype=np.int64))
        artifacts.atomic_write_bytes(folder / "targets.npy", buf)
        os.replace(partial, folder / "images.npy")
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    meta = {"kind": "cdabench-prepared", "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
            "num_images": n, "shape": list(shape), "bytes": prepared_bytes(n, shape)}
    artifacts.atomic_write_json(folder / META, meta)
    return meta


def _npy_bytes(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def open_prepared(folder: Path, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, targets) memory-mapped from a finished cache with this fingerprint, else None.
    Copy-on-write mapping: tensors are writable in memory, the file is never modified."""
    folder = Path(folder)
    if not (folder / META).exists():
        return None
    meta = artifacts.read_json(folder / META)
    if meta.get("fingerprint") != fingerprint or meta.get("format_version") != FORMAT_VERSION:
        return None
    images = np.load(folder / "images.npy", mmap_mode="c", allow_pickle=False)
    targets = np.load(folder / "targets.npy", allow_pickle=False)
    if images.shape != (meta["num_images"], *meta["shape"]) or len(targets) != meta["num_images"]:
        raise DataError(f"the prepared cache in {folder} does not match its meta.json (images {images.shape}, "
                        f"{len(targets)} targets): delete the folder to rebuild it")
    return torch.from_numpy(images), torch.from_numpy(targets)


def prepared_split(split: ImageSplit, cache_root: Path, view: str, shape: tuple[int, int, int],
                   workers: int = 0, build: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The split's prepared view from cache_root/<fingerprint>/, built first when missing or
    stale and `build` (else None)."""
    fingerprint = split_fingerprint(split, view)
    folder = Path(cache_root) / fingerprint[:24]
    found = open_prepared(folder, fingerprint)
    if found is None and build:
        import fcntl
        folder.mkdir(parents=True, exist_ok=True)
        # One builder: other ranks and workers wait on the lock (no collective call, so any
        # process may ask for any split at any time), then open what it built.
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = open_prepared(folder, fingerprint)
            if found is None:
                build_prepared(split, folder, fingerprint, shape, workers)
                found = open_prepared(folder, fingerprint)
    return found
