"""The copies people keep, read offline as a --data-root of the existing tasks: Hugging Face
`datasets` parquet shards (as on the Hub: data/<split>-00000-of-00001-<hash>.parquet, or the
converted <config>/<split>/0000.parquet) and `save_to_disk` folders (dataset_dict.json, one
folder of Arrow files per split), and WebDataset tar shards (<key>.jpg + <key>.cls pairs, as
timm's ImageNet copies are written: imagenet1k-train-0000.tar ...).

Splits: `train`, and the task's test split from the first of validation, valid, val, test that
exists (Tiny-ImageNet's copies call it `valid`, ImageNet's `validation`; ImageNet's `test` is
unlabelled and refused). Columns: the image column is the one whose Hugging Face feature is an
Image (encoded bytes in a {bytes, path} struct), else a struct with a `bytes` field or a binary
column; the label column is the ClassLabel feature (`label`, then `fine_label`), else an integer
column of one of LABEL_COLUMNS.

Class names: a parquet / Arrow copy's ClassLabel feature; a WebDataset sample's .json sidecar
field `class_name` (or `wnid`, `synset`) where every class has one.

Classes: the task's order is its dataset's (DatasetSpec.copy_order): "sorted" (the field's rule
for Tiny-ImageNet's wnids, and the official order of CIFAR's names, which is alphabetical) or
"imagenet-1k" (the standard 0-999 order of the sorted wnids; the Hub copy names classes by their
WordNet lemmas, matched through timm's table). A copy whose ClassLabel names are in another order
is refused with the mapping found; a copy without names (WebDataset, parquet without metadata)
is taken as in the task's order, and the run says so: only the guards (the class-order guard of an
official --teacher, the teacher-agreement guard of foreign sets) can catch a permuted one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cdabench import artifacts, progress

from .containers import EncodedImages, import_pyarrow, shard_rows
from .errors import DataError
from .images import ImageSplit
from .spec import DatasetSpec, Loaded

FORMATS = ("parquet", "save_to_disk", "webdataset")
TEST_SPLITS = ("validation", "valid", "val", "test")
SPLITS = ("train",) + TEST_SPLITS
LABEL_COLUMNS = ("label", "fine_label", "labels", "cls", "target")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
NAME_KEYS = ("class_name", "wnid", "synset")   # a WebDataset sample's .json fields that may name its class
_SPLIT_TOKEN = re.compile(r"(?:^|[-_.])(" + "|".join(SPLITS) + r")(?=[-_.]|$)")
# A WebDataset shard is numbered (imagenet1k-train-0000.tar, train/000012.tar): an archive of the
# official release beside the extracted folders (ILSVRC2012_img_train.tar) is not a shard.
_NUMBERED_SHARD = re.compile(r"(?:^|[-_.])\d+$")
_SCAN_SKIP = 64   # a folder with more sub-folders than this is a class tree, not a copy: not scanned


def _scan(root: Path, depth: int = 3) -> list[Path]:
    """Container files (.parquet, .tar, dataset_dict.json) within `depth` folder levels of root,
    without walking into class-folder trees (an ImageFolder is never listed file by file)."""
    found, folders = [], [root]
    for _ in range(depth + 1):
        deeper = []
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
            found += [Path(e.path) for e in entries if e.is_file() and
                      (e.name.endswith((".parquet", ".tar")) or e.name == "dataset_dict.json")]
            if len(subdirs) <= _SCAN_SKIP:
                deeper += [Path(e.path) for e in subdirs]
        folders = deeper
    return sorted(found)


def detect(root: Path) -> str | None:
    """The copy's format under `root` (one of FORMATS), or None for an official layout."""
    if (root / "dataset_dict.json").is_file():
        return "save_to_disk"
    files = _scan(root)
    if any(f.suffix == ".parquet" for f in files):
        return "parquet"
    if any(_is_shard(f) for f in files):
        return "webdataset"
    return None


def _is_shard(path: Path) -> bool:
    return path.suffix == ".tar" and _split_of(path) is not None and bool(_NUMBERED_SHARD.search(path.stem))


def _split_of(path: Path) -> str | None:
    """A shard's split: a split name in its file name (train-00000-of-00004.parquet,
    imagenet1k-validation-0003.tar), else its folder's name (<config>/train/0000.parquet)."""
    match = _SPLIT_TOKEN.search(path.stem)
    if match:
        return match.group(1)
    return path.parent.name if path.parent.name in SPLITS else None


def _choose_splits(by_split: dict[str, list], where: Path, spec: DatasetSpec) -> tuple[str, str]:
    test = next((s for s in TEST_SPLITS if s in by_split), None)
    if "train" not in by_split or test is None:
        raise DataError(f"{spec.name}: the copy in {where} has split(s) {', '.join(sorted(by_split)) or 'none'}; it "
                        f"needs `train` and one of {', '.join(TEST_SPLITS)} (the task's test split)")
    return "train", test


# ------------------------------------------------------------------ Hugging Face features
def _features(metadata: dict | None) -> dict:
    """The `features` of a Hugging Face schema's metadata ({b"huggingface": {"info": {"features"}}})."""
    if not metadata or b"huggingface" not in metadata:
        return {}
    try:
        return json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        return {}


def _columns(schema, features: dict, where: str) -> tuple[str, str, list[str] | None]:
    """(image column, label column, ClassLabel names or None)."""
    pa = import_pyarrow()
    names = list(schema.names)
    typed = {n: (features.get(n) or {}).get("_type") for n in names}
    images = [n for n in names if typed[n] == "Image"] or \
        [n for n in names if pa.types.is_struct(schema.field(n).type) and
         schema.field(n).type.get_field_index("bytes") >= 0] or \
        [n for n in names if pa.types.is_binary(schema.field(n).type) or pa.types.is_large_binary(schema.field(n).type)]
    class_labels = [n for n in names if typed[n] == "ClassLabel"]
    labels = [n for n in LABEL_COLUMNS if n in class_labels] or class_labels or \
        [n for n in LABEL_COLUMNS if n in names and pa.types.is_integer(schema.field(n).type)]
    if len(images) != 1 or not labels:
        raise DataError(f"{where}: cannot tell the image and label columns apart in columns {names}: expected one "
                        f"image column (a Hugging Face Image feature, {{bytes, path}}) and a ClassLabel or integer "
                        f"column named one of {', '.join(LABEL_COLUMNS)}")
    label = labels[0]
    class_names = (features.get(label) or {}).get("names") if typed[label] == "ClassLabel" else None
    return images[0], label, class_names


# ------------------------------------------------------------------ per format: splits as (EncodedImages, labels)
def _parquet_split(files: list[Path], root: Path):
    pq = import_pyarrow().parquet
    labels, shard, locator, row_groups, rows, column, names, label = [], [], [], [], [], None, None, None
    for k, path in enumerate(files):
        handle = pq.ParquetFile(path)
        schema = handle.schema_arrow
        found = _columns(schema, _features(schema.metadata), str(path))
        if column is not None and found != (column, label, names):
            raise DataError(f"{path} has other columns or class names than {files[0]}: one split, one schema")
        column, label, names = found
        values = handle.read(columns=[label]).column(label).to_numpy()
        meta = handle.metadata
        row_groups.append(np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups - 1)]))
        labels.append(values)
        shard.append(np.full(len(values), k))
        locator.append(np.arange(len(values)))
        rows.append(len(values))
    sizes = shard_rows([f.stat().st_size for f in files], rows)
    encoded = EncodedImages("parquet", root, files, np.concatenate(shard), np.concatenate(locator), sizes, column,
                            row_groups)
    return encoded, np.concatenate(labels), names


def _arrow_split(folder: Path, root: Path):
    pa = import_pyarrow()
    state = artifacts.read_json(folder / "state.json") if (folder / "state.json").is_file() else {}
    files = [folder / f["filename"] for f in state.get("_data_files", [])] or sorted(folder.glob("*.arrow"))
    info = artifacts.read_json(folder / "dataset_info.json") if (folder / "dataset_info.json").is_file() else {}
    labels, shard, locator, rows, found = [], [], [], [], None
    for k, path in enumerate(files):
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        found = _columns(table.schema, info.get("features") or _features(table.schema.metadata), str(path))
        values = table.column(found[1]).to_numpy()
        labels.append(values)
        shard.append(np.full(len(values), k))
        locator.append(np.arange(len(values)))
        rows.append(len(values))
    if found is None:
        raise DataError(f"{folder} holds no Arrow file (state.json lists none, no *.arrow): re-save it with save_to_disk")
    sizes = shard_rows([f.stat().st_size for f in files], rows)
    encoded = EncodedImages("arrow", root, files, np.concatenate(shard), np.concatenate(locator), sizes, found[0])
    return encoded, np.concatenate(labels), found[2]


def _tar_index(path: Path) -> dict[str, np.ndarray]:
    """One WebDataset shard's images: their byte offsets and sizes, their labels (.cls) and, where
    the samples' .json sidecars name their class (NAME_KEYS), each label's name."""
    samples: dict[str, dict] = {}
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            cut = member.name.find(".", member.name.rfind("/") + 1)
            if cut < 0:
                continue
            key, suffix = member.name[:cut], member.name[cut + 1:].lower()
            sample = samples.setdefault(key, {})
            if suffix in IMAGE_SUFFIXES:
                sample["image"] = (member.offset_data, member.size)
            elif suffix == "cls":
                raw.seek(member.offset_data)
                text = raw.read(member.size).decode("ascii", "replace").strip()
                if not text.lstrip("-").isdigit():
                    raise DataError(f"{path}: {member.name} holds {text[:20]!r}, not a class index")
                sample["label"] = int(text)
            elif suffix == "json":
                raw.seek(member.offset_data)
                try:
                    meta = json.loads(raw.read(member.size))
                except ValueError:
                    continue
                name = next((meta[k] for k in NAME_KEYS if isinstance(meta, dict) and isinstance(meta.get(k), str)), None)
                if name is not None:
                    sample["name"] = name
    images = {k: s for k, s in samples.items() if "image" in s}
    unlabelled = [k for k, s in images.items() if "label" not in s]
    if unlabelled:
        raise DataError(f"{path}: sample {unlabelled[0]!r} has an image but no .cls label ({len(unlabelled)} such); "
                        "WebDataset shards need <key>.cls beside <key>.jpg")
    keys = sorted(images)
    named = {images[k]["label"]: images[k]["name"] for k in keys if "name" in images[k]}
    return {"offset": np.array([images[k]["image"][0] for k in keys], dtype=np.int64),
            "size": np.array([images[k]["image"][1] for k in keys], dtype=np.int64),
            "label": np.array([images[k]["label"] for k in keys], dtype=np.int64),
            "name_label": np.array(sorted(named), dtype=np.int64), "name": np.array([named[k] for k in sorted(named)],
                                                                                    dtype=np.str_)}


def _cached_tar_index(path: Path, cache: Path | None) -> dict[str, np.ndarray]:
    """The shard's index, kept in `cache` under its path, size and modification time (an index of
    ImageNet's 1,024 train shards reads every member header once, then never again)."""
    if cache is None:
        return _tar_index(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    stored = Path(cache) / f"{key}.npz"
    if stored.is_file():
        with np.load(stored, allow_pickle=False) as found:
            return {k: found[k] for k in ("offset", "size", "label", "name_label", "name")}
    index = _tar_index(path)
    buffer = io.BytesIO()
    np.savez(buffer, **index)
    artifacts.atomic_write_bytes(stored, buffer.getvalue())
    return index


def _tar_split(files: list[Path], root: Path, cache: Path | None):
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        indexes = list(pool.map(lambda f: _cached_tar_index(f, cache), files))
    shard = np.concatenate([np.full(len(ix["label"]), k) for k, ix in enumerate(indexes)])
    encoded = EncodedImages("tar", root, files, shard, np.concatenate([ix["offset"] for ix in indexes]),
                            np.concatenate([ix["size"] for ix in indexes]))
    labels = np.concatenate([ix["label"] for ix in indexes])
    named: dict[int, str] = {}
    for file, ix in zip(files, indexes):
        for label, name in zip(ix["name_label"].tolist(), ix["name"].tolist()):
            if named.setdefault(label, name) != name:
                raise DataError(f"{file}: label {label} is named {name!r} here and {named[label]!r} in another sample")
    count = int(labels.max()) + 1 if len(labels) else 0
    # Names only when every class present has one (a sidecar that names some samples names nothing).
    names = [named[i] for i in range(count)] if named and all(i in named for i in range(count)) else None
    return encoded, labels, names


def _read_splits(root: Path, fmt: str, spec: DatasetSpec, index_cache: Path | None) -> dict[str, tuple]:
    """{"train": (EncodedImages, labels, names), "test": ...}."""
    if fmt == "save_to_disk":
        listed = artifacts.read_json(root / "dataset_dict.json").get("splits", [])
        train, test = _choose_splits({s: [] for s in listed}, root, spec)
        return {"train": _arrow_split(root / train, root), "test": _arrow_split(root / test, root)}
    by_split: dict[str, list[Path]] = {}
    for path in _scan(root):
        if (_is_shard(path) if fmt == "webdataset" else path.suffix == ".parquet" and _split_of(path)):
            by_split.setdefault(_split_of(path), []).append(path)
    train, test = _choose_splits(by_split, root, spec)
    for split in (train, test):
        folders = sorted({p.parent for p in by_split[split]})
        if len(folders) > 1:
            raise DataError(f"{spec.name}: the {split} shards of the copy in {root} lie in several folders "
                            f"({', '.join(map(str, folders[:3]))}): several configs? Point --data-root at one of them")
    if fmt == "parquet":
        return {"train": _parquet_split(by_split[train], root), "test": _parquet_split(by_split[test], root)}
    return {"train": _tar_split(by_split[train], root, index_cache), "test": _tar_split(by_split[test], root, index_cache)}


# ------------------------------------------------------------------ classes
def _imagenet_classes() -> tuple[list[str], dict[str, set[int]]]:
    """The standard ImageNet-1k order (sorted wnids) and, for every name that denotes classes in
    it, those classes: a wnid its own; a WordNet lemma line as the Hub copy writes it ("tench,
    Tinca tinca"), and its first lemma, every class it names (two are named "crane", two
    "maillot")."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo("imagenet-1k")
    wnids = list(info.label_names())
    aliases: dict[str, set[int]] = {}
    for i, (wnid, lemmas) in enumerate(zip(wnids, info.label_descriptions())):
        for name in (wnid, lemmas, lemmas.split(",")[0].strip()):
            aliases.setdefault(name, set()).add(i)
    return wnids, aliases


def _mismatch(found: list[tuple[int, str, int]], rule: str, where: str) -> DataError:
    shown = "; ".join(f"label {i} is {name!r}, class {j} in the task's order" for i, name, j in found[:5])
    return DataError(f"{where}: its ClassLabel names are not in the task's class order ({rule}): {shown}"
                     f"{f' (and {len(found) - 5} more)' if len(found) > 5 else ''}. Trained as they are, every class "
                     "would carry another's name. Re-encode the labels in the task's order (datasets' "
                     "`align_labels_with_mapping`), or use the dataset's official layout")


def copy_classes(spec: DatasetSpec, names: list[str] | None, labels: list[np.ndarray], where: str) -> list[str]:
    """The task's class names for a copy, after checking the copy's ClassLabel names against the
    task's order (spec.copy_order); refused with the mapping found when they disagree."""
    count = int(max((int(lab.max()) for lab in labels if len(lab)), default=-1)) + 1
    if any(len(lab) and int(lab.min()) < 0 for lab in labels):
        raise DataError(f"{where}: a split has unlabelled images (label < 0), e.g. ImageNet's test split: use a "
                        "labelled split as the test split")
    if spec.copy_order == "imagenet-1k":
        wnids, aliases = _imagenet_classes()
        if names:
            known = [(i, n, aliases.get(n) or aliases.get(n.split(",")[0].strip())) for i, n in enumerate(names)]
            wrong = [(i, n, min(js)) for i, n, js in known if js and i not in js]
            if wrong:
                raise _mismatch(wrong, "ImageNet-1k's standard 0-999 order, the sorted wnids", where)
            if not any(js for _, _, js in known):
                progress.log(f"{where}: its class names are neither wnids nor timm's ImageNet lemmas, so their order "
                             "was not checked; the guards (an official --teacher's class-order guard, the "
                             "teacher-agreement guard of foreign sets) are the check")
        else:
            _say_unnamed(where)
        return wnids
    if names:
        if len(names) < count:
            raise DataError(f"{where}: labels reach {count - 1} but its ClassLabel names only {len(names)} classes")
        order = sorted(names)
        wrong = [(i, n, order.index(n)) for i, n in enumerate(names) if order[i] != n]
        if wrong:
            raise _mismatch(wrong, "the sorted class names" + (": Tiny-ImageNet's sorted wnids"
                                                                 if spec.name == "tiny-imagenet" else ""), where)
        return list(names)
    _say_unnamed(where)
    return [str(i) for i in range(count)]


def _say_unnamed(where: str) -> None:
    progress.log(f"{where}: the copy carries no class names; its labels are taken as the task's class indices. "
                 "Only the guards can catch a permuted copy: an official --teacher's class-order guard, and the "
                 "teacher-agreement guard of foreign distilled sets")


def load_copy(root: Path, fmt: str, spec: DatasetSpec, image_size: int, index_cache: Path | None = None) -> Loaded:
    """The train and test splits of a copy (one of FORMATS) under `root`, with the task's classes."""
    if spec.copy_order is None:
        raise DataError(f"{spec.name}: a {fmt} copy is not supported for this dataset; use its official layout: "
                        f"{spec.layout}")
    splits = _read_splits(root, fmt, spec, index_cache)
    names = [s[2] for s in splits.values()]
    if names[0] != names[1]:
        raise DataError(f"{spec.name}: the copy in {root} names its classes differently in its train and test splits")
    classes = copy_classes(spec, names[0], [s[1] for s in splits.values()], f"{spec.name} {fmt} copy in {root}")
    # Stored images are decoded at the working size (a fixed-size dataset's copy is normally at it already).
    resize_to = image_size if spec.fixed_size else None
    train, test = (ImageSplit.from_encoded(encoded, labels, spec.channels, root=root, resize_to=resize_to)
                   for encoded, labels, _ in splits.values())
    return train, test, classes
