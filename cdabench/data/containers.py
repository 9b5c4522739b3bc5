"""Encoded images kept inside container files: Hugging Face `datasets` parquet shards, the Arrow
files of a `save_to_disk` folder, WebDataset tar shards. `EncodedImages` is an index (shard,
locator per image) that reads one image's encoded bytes on demand:

- tar: a byte offset and size, read with one seek (any order is cheap);
- parquet: a row of a row group; the last row group read is kept per process, so the prepared
  cache (data/prepared.py), which decodes contiguous chunks, reads each row group once per worker
  (a random order, CDABENCH_PREPARED=0, reads a row group per image: slow on large row groups);
- Arrow (save_to_disk): the file memory-mapped, so any row is read in place.

Its identity (for fingerprints) is every shard's path relative to the data root and size (and
modification time, for the prepared cache and the one-scan listing key), and every image's
locator: one stat per shard, no reads. Nothing here runs code from the files: tar members are
read as bytes, parquet and Arrow through pyarrow's readers.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import DataError

KINDS = ("tar", "parquet", "arrow")
PYARROW_HINT = "pip install 'cdabench[hf]' (pyarrow reads Hugging Face parquet and save_to_disk copies)"


def import_pyarrow():
    """pyarrow, or a DataError naming the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (save_to_disk's Arrow stream files)
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise DataError(f"reading this copy needs pyarrow, which is not installed ({exc}): {PYARROW_HINT}") from exc
    return pyarrow


class EncodedImages:
    """`kind` in KINDS; `shards`: the container files; per image `shard` (index into shards) and
    `locator` (tar: byte offset; parquet / Arrow: row in the file) and `size` (tar: bytes; else
    the shard's bytes per row, an estimate). `column`: the image column of a parquet / Arrow file
    (its `bytes` field when it is a struct, as the Hugging Face Image feature stores it);
    `row_groups`: per parquet shard, the first row of each row group."""

    def __init__(self, kind: str, root: Path, shards: list[Path], shard: np.ndarray, locator: np.ndarray,
                 size: np.ndarray, column: str | None = None, row_groups: list[np.ndarray] | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown container kind {kind!r}: use {', '.join(KINDS)}")
        self.kind, self.root, self.shards = kind, Path(root), [Path(s) for s in shards]
        self.shard = np.asarray(shard, dtype=np.int32)
        self.locator = np.asarray(locator, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        self.column, self.row_groups = column, row_groups
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}   # open files and row groups stay in the process that opened them
        return state

    def subset(self, idx: np.ndarray) -> "EncodedImages":
        return EncodedImages(self.kind, self.root, self.shards, self.shard[idx], self.locator[idx], self.size[idx],
                             self.column, self.row_groups)

    def where(self, i: int) -> str:
        """Image i's place, for error messages."""
        unit = "byte offset" if self.kind == "tar" else "row"
        return f"{self.shards[self.shard[i]]} ({unit} {self.locator[i]})"

    # ------------------------------------------------------------------ reading
    def read(self, i: int) -> bytes:
        shard, locator = int(self.shard[i]), int(self.locator[i])
        if self.kind == "tar":
            handle = self._open(shard)
            handle.seek(locator)
            data = handle.read(int(self.size[i]))
        elif self.kind == "parquet":
            group = int(np.searchsorted(self.row_groups[shard], locator, side="right")) - 1
            values = self._row_group(shard, group)
            data = values[locator - int(self.row_groups[shard][group])]
        else:
            data = self._arrow_column(shard)[locator].as_py()
        if not data:
            raise DataError(f"{self.where(i)} holds no image bytes (only a file path?): re-save the copy with its "
                            "images embedded (datasets' save_to_disk / push_to_hub do), or use the official layout")
        return data

    def _open(self, shard: int):
        handles = self._cache.setdefault("files", {})
        if shard not in handles:
            if len(handles) >= 16:   # a bounded number of open files per process
                handles.pop(next(iter(handles))).close()
            handles[shard] = open(self.shards[shard], "rb")
        return handles[shard]

    def _row_group(self, shard: int, group: int) -> list:
        if self._cache.get("group_key") != (shard, group):
            pq = import_pyarrow().parquet
            table = pq.ParquetFile(self.shards[shard]).read_row_group(group, columns=[self.column])
            self._cache.update(group_key=(shard, group), group=image_bytes(table.column(self.column)).to_pylist())
        return self._cache["group"]

    def _arrow_column(self, shard: int):
        columns = self._cache.setdefault("arrow", {})
        if shard not in columns:
            pa = import_pyarrow()
            table = pa.ipc.open_stream(pa.memory_map(str(self.shards[shard]))).read_all()
            columns[shard] = image_bytes(table.column(self.column))
        return columns[shard]

    # ------------------------------------------------------------------ identity
    def update_identity(self, hasher: "hashlib._Hash", mtimes: bool = False) -> None:
        """Every shard's relative path and size (and modification time with `mtimes`), then every
        image's shard and locator: one stat per shard, no reads."""
        lines = [file_identity_line(shard, self.root, mtimes) for shard in self.shards]
        hasher.update(f"{self.kind}{len(lines)}\n{''.join(lines)}".encode())
        hasher.update(self.shard.astype("<i4").tobytes())
        hasher.update(self.locator.astype("<i8").tobytes())

    def stored_bytes(self) -> int:
        return int(self.size.sum())


def image_bytes(column):
    """The encoded bytes of an image column: the `bytes` field of the Hugging Face Image struct
    ({bytes, path}), or the column itself when it is plain binary."""
    pa = import_pyarrow()
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if pa.types.is_struct(column.type):
        return column.field("bytes")
    return column


def shard_rows(sizes: list[int], rows: list[int]) -> np.ndarray:
    """Per row, its shard's bytes per row: the stored size of an image inside a parquet or Arrow
    shard, apportioned (its compressed bytes are not separable without reading them)."""
    return np.concatenate([np.full(n, size // max(1, n), dtype=np.int64) for size, n in zip(sizes, rows)]) \
        if rows else np.zeros(0, dtype=np.int64)


def file_identity_line(path: Path, root: Path, mtime: bool = True) -> str:
    """One line of a fingerprint: the file's path relative to `root`, its size and (with `mtime`)
    its modification time; one stat, no read. A file that cannot be stat'ed is a DataError."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot stat {path} ({exc}); restore the file or reload the dataset") from exc
    return f"{Path(os.path.relpath(path, root)).as_posix()}\t{stat.st_size}" + (f"\t{stat.st_mtime_ns}" if mtime else "") + "\n"
