"""Atomic writes and content hashes: nothing half-written is ever taken for a finished artifact."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def canonical_json(obj: Any) -> str:
    """Sorted keys and fixed separators: the same object always gives the same text (and hash)."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def _json_default(obj: Any):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, canonical_json(obj).encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_config(obj: Any) -> str:
    """Content hash of a JSON-able configuration: the cache key of a stage."""
    return sha256_bytes(canonical_json(obj).encode())


def hash_file_map(files: dict[str, str]) -> str:
    """One hash over {relative path: file hash}, independent of the order files were written in."""
    return hash_config(sorted(files.items()))


def encode_image(image: torch.Tensor, fmt: str = "png") -> bytes:
    """uint8 (C, H, W) -> PNG (lossless, default) or JPEG quality 75 (the official SRe2L/CDA output)."""
    array = image.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    if fmt == "png":
        pil.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "jpeg75":
        pil.save(buf, format="JPEG", quality=75)
    else:
        raise ValueError(f"unknown image format {fmt!r}: use png or jpeg75")
    return buf.getvalue()


def image_suffix(fmt: str) -> str:
    return {"png": ".png", "jpeg75": ".jpg"}[fmt]


def save_state_dict(path: Path, state: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state_dict(path: Path, map_location="cpu") -> dict:
    # weights_only: a checkpoint is data, never code to unpickle.
    return torch.load(path, map_location=map_location, weights_only=True)


class UnsafeFileError(ValueError):
    """A torch file holds a Python object that the weights-only loader does not allow."""


def load_weights_only(path: Path, what: str, allowed: tuple = ()):
    """torch.load(path, weights_only=True) with exactly the extra globals in `allowed` (objects,
    or (object, "module.name") pairs for a name an older library wrote, e.g. numpy 1's
    numpy.core.multiarray.scalar). Nothing in the file is ever executed: any other global is
    refused before anything is built, and the error names it (`what` says which file it is)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        try:  # a scan of the pickle's opcodes: it names the globals without running any of them
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        allowed_names = {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in allowed}
        unsafe = [g for g in unsafe if g not in allowed_names]
        if unsafe:
            raise UnsafeFileError(
                f"{what} {path} holds Python objects that a weights-only load refuses: {', '.join(unsafe)}. "
                "Unpickling them could run code, so cdabench never does; a file that holds only tensors, numbers, "
                "strings, lists and dicts" + (f" (and {', '.join(sorted(allowed_names))})" if allowed_names else "")
                + " loads. Re-save the data as plain tensors (e.g. torch.save(model.state_dict(), path))") from exc
        raise UnsafeFileError(f"cannot read {what} {path} as a weights-only torch file: {exc}") from exc
