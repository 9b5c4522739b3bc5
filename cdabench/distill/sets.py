"""Distilled sets: `distill` makes one (squeeze -> recover, or a selection baseline) with its
manifest, writing only atomically and reusing whatever finished work it finds (teacher cache,
recover shards); `load_distilled` reads one back (ours, or any ImageFolder such as the official
releases) for evaluation; `load_external` reads another method's set as that method ships it
(formats.py), in its declared value space (spaces.py), with its own labels (fkd.py)."""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdabench import artifacts, progress
from cdabench.config import ConfigError, external_source_path, load_method, recover_config, split_settings
from cdabench.data import DataError, load_imagefolder
from cdabench.data.resources import check_free_memory, check_images_on_disk
from cdabench.distill.fkd import import_fkd
from cdabench.distill.formats import read_shipped
from cdabench.distill.recover import image_relpath, run_recover
from cdabench.distill.select import select_herding, select_random
from cdabench.distill.spaces import ZCA, task_zca, to_pixels
from cdabench.distill.squeeze import StageMissing, Teacher, get_teacher
from cdabench.engine.context import Context, check_ipc, eval_transform
from cdabench.engine.runtime import device_description, versions
from cdabench.engine.train import ImageBank
from cdabench.schema import ExternalSource, Method

MANIFEST = "manifest.json"
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


def class_folders(classes: list[str]) -> list[str]:
    """Folder per class: the class name when it is a safe file name (wnids, digits), else the
    zero-padded index (read back by its trailing integer)."""
    if all(_SAFE.match(c) for c in classes) and len(set(classes)) == len(classes):
        return list(classes)
    return [f"{i:04d}" for i in range(len(classes))]


def _check_same_run(path: Path, config: dict) -> None:
    if path.exists():
        previous = artifacts.read_json(path)
        if previous != config:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise ConfigError(f"{path.parent} already holds a different distillation (differs in: {', '.join(changed)}); "
                              "use another --out, or delete that folder to start over")


def distill(ctx: Context, method_name: str, ipc: int | None, seed: int, out: str | Path,
            teacher_path: str | None = None, command: str = "", teacher: Teacher | None = None,
            make: bool = True) -> dict:
    """`teacher`: one already loaded and guarded (a suite passes its own, so it is not reloaded
    and re-checked for every set). `make=False`: read back a finished set only (StageMissing
    when `out` holds none; a shard of a suite makes no shared stage)."""
    method = load_method(method_name)
    if method.kind == "external":
        raise ConfigError(f"{method_name} is an external method: its set exists already. Evaluate it with "
                          f"`cdabench evaluate --data {method_name}`, or name it in a suite's --methods")
    out = Path(out)
    full = method.kind == "select" and method.strategy == "full"
    if not full:
        if ipc is None or ipc < 1:
            raise ConfigError(f"method {method.name} needs --ipc N (a positive number of images per class)")
        if method.kind == "select":
            check_ipc(ctx, ipc)
    synthetic = method.kind in ("recover", "noise")
    needs_teacher = synthetic or method.strategy == "herding"
    if not needs_teacher:
        teacher = None
    elif teacher is None:
        teacher = get_teacher(ctx, teacher_path)
    rconfig = recover_config(ctx.task, method) if synthetic else None
    folders = class_folders(ctx.classes)
    run_config = {"task": ctx.task.name, "dataset": ctx.data.fingerprint(), "split": split_settings(ctx.task),
                  "method": method.name,
                  "ipc": None if full else ipc, "seed": seed, "classes": ctx.classes, "image_size": ctx.image_size,
                  "teacher": teacher.hash if teacher else None,
                  "recover": rconfig.to_dict() if rconfig else None, "strategy": method.strategy or None}
    _check_same_run(out / "distill.json", run_config)
    if (out / MANIFEST).exists():  # finished earlier with the same configuration: nothing to do
        return artifacts.read_json(out / MANIFEST)
    if not make:
        raise StageMissing(f"the distilled set {method.name} {'full' if full else f'ipc {ipc}'} seed {seed} "
                           f"is not finished in {out} (no {MANIFEST})")
    if ctx.group.is_main:
        if not full:  # before anything is written: the set's disk, printed and checked
            check_images_on_disk(out, ipc * ctx.num_classes, ctx.shape, rconfig.image_format if rconfig else "png",
                                 f"distill {method.name} ipc {ipc}")
        artifacts.atomic_write_json(out / "distill.json", run_config)
    ctx.group.barrier()
    start = time.perf_counter()
    selection, compiled = None, None
    if synthetic:
        markers = run_recover(teacher.model, out, folders, ipc, rconfig, seed, ctx.shape, ctx.mean, ctx.std,
                              ctx.device, ctx.group)
        files = {rel: digest for m in markers.values() for rel, digest in m["files"].items()}
        stage_seconds = sum(m["seconds"] for m in markers.values())
        ran = {bool(m.get("compiled")) for m in markers.values()}   # a resumed run may mix the two
        compiled = ran.pop() if len(ran) == 1 else "mixed"
    elif full:
        files, stage_seconds = {}, 0.0
    else:
        targets = np.asarray(ctx.fit.targets)
        if method.strategy == "random":
            chosen = select_random(targets, ipc, seed)
        else:
            chosen = select_herding(teacher.model, lambda idx: _fit_images(ctx, idx), targets, ipc,
                                    ctx.normalizer(), ctx.device)
        files = _write_selection(ctx, out, chosen, folders) if ctx.group.is_main else {}
        selection = {ctx.classes[c]: idx.tolist() for c, idx in chosen.items()}
        stage_seconds = time.perf_counter() - start
    manifest = {
        "kind": "cdabench-distilled", "format_version": 1, "task": ctx.task.name, "dataset": ctx.data.spec.name,
        "method": method.name, "ipc": None if full else ipc, "seed": seed, "classes": ctx.classes,
        "class_folders": folders, "image_size": ctx.image_size, "channels": ctx.shape[0],
        "image_format": rconfig.image_format if rconfig else "png", "full": full, "selection": selection,
        "precision": rconfig.precision if rconfig else None,  # of recover's teacher forward
        "compiled": compiled,  # whether recover's teacher forward was compiled
        "files": files, "images_hash": artifacts.hash_file_map(files) if not full else ctx.data.fingerprint(),
        "image_bytes": sum((out / "images" / rel).stat().st_size for rel in files) if not full else _real_bytes(ctx),
        "teacher": {"hash": teacher.hash, "source": teacher.info.get("source"),
                    "probe_top1": teacher.info.get("probe_top1"), "heldout_top1": teacher.info.get("heldout_top1"),
                    "seconds": teacher.info.get("seconds", 0.0)} if teacher else None,
        "config": run_config, "seconds": {"squeeze": teacher.info.get("seconds", 0.0) if teacher else 0.0,
                                          "recover" if synthetic else "select": stage_seconds},
        "versions": versions(), "device": device_description(ctx.device), "command": command,
    }
    if ctx.group.is_main:
        artifacts.atomic_write_json(out / MANIFEST, manifest)
        progress.log(f"distilled {method.name} ipc {ipc} -> {out} ({len(files)} images, {stage_seconds:.1f}s)")
    ctx.group.barrier()
    # Every rank returns rank 0's manifest: the others did not write a selection's files.
    return manifest if ctx.group.is_main else artifacts.read_json(out / MANIFEST)


def _fit_images(ctx: Context, indices: np.ndarray) -> torch.Tensor:
    source = ctx.source("fit")
    if isinstance(source, ImageBank):
        return source.images[torch.from_numpy(np.asarray(indices))]
    return ctx.fit.subset(indices).with_transform(eval_transform(ctx.data)).load_all()


def _write_selection(ctx: Context, out: Path, chosen: dict[int, np.ndarray], folders: list[str]) -> dict[str, str]:
    files = {}
    for c, indices in chosen.items():
        for k, image in enumerate(_fit_images(ctx, indices)):
            data = artifacts.encode_image(image, "png")
            rel = image_relpath(folders[c], k, "png")
            artifacts.atomic_write_bytes(out / "images" / rel, data)
            files[rel] = artifacts.sha256_bytes(data)
    return files


def _real_bytes(ctx: Context) -> int:
    stored = ctx.fit.stored_bytes()
    return stored if stored is not None else len(ctx.fit) * int(np.prod(ctx.shape))


def _verify_files(folder: Path, files: dict[str, str]) -> None:
    """The images must be the ones the manifest describes: a record's image hash is their hash."""
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            raise DataError(f"{path} is listed in the manifest but missing: re-run `cdabench distill` with the "
                            "same arguments to restore it")
        if artifacts.sha256_file(path) != digest:
            raise DataError(f"{path} changed since it was distilled (sha256 differs from manifest.json): "
                            "re-distil into a fresh --out, or remove manifest.json to evaluate it as a foreign folder")


def load_distilled(ctx: Context, data_dir: str | Path) -> tuple[object, dict]:
    """A distilled set as a training source plus its description. Ours (with manifest.json) or any
    ImageFolder of distilled images (e.g. the official SRe2L/CDA releases), mapped onto the task's
    classes; a class count or name mismatch is refused."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"distilled data folder {data_dir} does not exist: pass the --out folder of "
                        "`cdabench distill`, or an ImageFolder of images (one sub-folder per class)")
    manifest = artifacts.read_json(data_dir / MANIFEST) if (data_dir / MANIFEST).exists() else None
    if manifest is not None:
        if manifest["classes"] != ctx.classes:
            raise DataError(f"{data_dir} was distilled with another class map ({len(manifest['classes'])} classes, "
                            f"task {ctx.task.name} has {ctx.num_classes}): evaluate it with its own task")
        if manifest.get("full"):
            return ctx.source("fit"), manifest
    folder = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    if manifest is not None:
        _verify_files(folder, manifest["files"])
    split, _ = load_imagefolder(folder, ctx.shape[0], classes=ctx.classes)
    # The set is held in memory as uint8 at the working size (and its float batches on the device).
    check_free_memory(len(split) * ctx.shape[0] * ctx.shape[1] * ctx.shape[2], f"the distilled set in {folder}",
                      "free memory, or evaluate a smaller set")
    images = split.load_all()
    if tuple(images.shape[1:]) != ctx.shape:
        raise DataError(f"distilled images in {folder} are {tuple(images.shape[1:])} (C, H, W) but task "
                        f"{ctx.task.name} works at {ctx.shape}: distil at the task's size or pass --task with a "
                        "matching image_size")
    targets = torch.as_tensor(np.asarray(split.targets))
    if manifest is None:
        files = {str(Path(p).relative_to(folder)): artifacts.sha256_file(p) for p in split.paths}
        counts = np.bincount(targets.numpy(), minlength=ctx.num_classes)
        manifest = {"method": "external", "ipc": int(counts.min()), "seed": None, "files": files,
                    "images_hash": artifacts.hash_file_map(files),
                    "image_bytes": sum(Path(p).stat().st_size for p in split.paths), "seconds": {}}
    return ImageBank(images, targets), manifest


# ---------------------------------------------------------------------- other methods' sets
@dataclass
class ExternalSet:
    """Another method's set, ready to train on: pixel-space images (uint8, or float32 in [0, 1]
    units), task class indices, the labels and learning rate the method shipped, and the manifest
    (JSON: what was read, how, and its hashes) that the record carries as `source`."""

    bank: ImageBank
    manifest: dict
    label_source: str                  # hard | logits | fkd: what a `method`-label cell trains on
    logits: torch.Tensor | None = None
    lr: float | None = None
    fkd_store: Path | None = None      # our label store imported from the method's FKD directory
    fkd_manifest: dict | None = None
    zca: ZCA | None = None             # zca sets: the student sees whitened inputs (spaces.ZCANormalizer)


def adhoc_method(path: str, fmt: str | None = None, space: str | None = None, fkd: str | None = None) -> Method:
    """`evaluate --data PATH [--format F] [--space S] [--fkd DIR]` as a method entry named `external`."""
    source = ExternalSource(path=str(Path(path).resolve()), format=fmt or "auto", space=space or "pixel",
                            fkd_path=str(Path(fkd).resolve()) if fkd else "", labels="fkd" if fkd else "auto")
    return Method(name="external", kind="external", source=source, description=f"the set at {path}")


def _task_labels(labels: torch.Tensor, source: ExternalSource, ctx: Context, where: str) -> torch.Tensor:
    """The set's label indices as the task's class indices (class_order: the task class of each)."""
    if source.class_order:
        unknown = [c for c in source.class_order if c not in ctx.classes]
        if unknown or len(source.class_order) != ctx.num_classes:
            raise DataError(f"class_order of {where} must name each of the {ctx.num_classes} classes of task "
                            f"{ctx.task.name} once (unknown: {unknown[:5]})")
        index = torch.tensor([ctx.classes.index(c) for c in source.class_order])
        labels = index[labels]
    if len(labels) and (labels.min() < 0 or labels.max() >= ctx.num_classes):
        raise DataError(f"{where} has class indices up to {int(labels.max())}, but task {ctx.task.name} has "
                        f"{ctx.num_classes} classes: evaluate it with its own task")
    return labels.long()


def load_external(ctx: Context, method: Method) -> ExternalSet:
    """Read an external method's set (its [source] table) and check it before anything trains:
    format, shape, class indices, and that its values fit the declared space."""
    source = method.source
    path = external_source_path(method, source.path)
    where = f"the {method.name} set at {path}"
    shipped = read_shipped(path, source.format, ctx.shape[0], ctx.image_size, ctx.classes, source.experiment)
    if source.class_order and shipped.paths is not None and ctx.classes[0] in {
            Path(rel).parts[0] for rel in shipped.files}:
        raise DataError(f"{where}: class_order renumbers label indices, but this folder's class folders are named "
                        "after the task's classes (they map by name): remove class_order, or name the folders by index")
    labels = _task_labels(shipped.labels, source, ctx, where)
    logits = shipped.logits
    if logits is not None and logits.shape[1] != ctx.num_classes:
        raise DataError(f"{where} ships logits over {logits.shape[1]} classes; task {ctx.task.name} has {ctx.num_classes}")
    if logits is not None and source.class_order:   # the columns follow the set's label order too
        columns = torch.tensor([ctx.classes.index(c) for c in source.class_order])
        logits = torch.zeros_like(logits).index_copy_(1, columns, logits)
    if shipped.space == "pixel" and source.space != "pixel":
        why = shipped.notes.get("images_zca_file", "image files hold pixel values")
        raise DataError(f"{where} is declared as {source.space} values, but its images are pixels ({why}): "
                        "declare space pixel")
    zca = task_zca(ctx, source.zca_eps) if source.space == "zca" else None
    if shipped.images.dtype == torch.uint8:
        images = shipped.images
    else:
        mean, std = (source.mean or ctx.mean, source.std or ctx.std) if source.space == "normalized" else ((), ())
        images = to_pixels(shipped.images, source.space, where, mean, std, zca).contiguous()
    label_source = source.labels
    if label_source == "auto":
        label_source = "logits" if logits is not None else ("fkd" if source.fkd_path else "hard")
    if label_source == "logits" and logits is None:
        raise DataError(f"{where} ships no per-image logits, but its entry says labels = 'logits'")
    fkd_store = fkd_manifest = None
    if label_source == "fkd":
        if shipped.paths is None:
            raise DataError(f"{where}: FKD soft labels index the images of a folder; this set is a {shipped.notes['format']} file")
        stored = shipped.notes.get("resized_from", [ctx.image_size])[0]
        fkd_store, fkd_manifest = import_fkd(external_source_path(method, source.fkd_path), shipped.paths, path,
                                             ctx.image_size, source.fkd_input_size or stored, source.fkd_seed, ctx.cache)
    counts = np.bincount(labels.numpy(), minlength=ctx.num_classes)
    if source.ipc is not None and not (counts == source.ipc).all():
        raise DataError(f"{where} has {int(counts.min())}..{int(counts.max())} images per class, but its entry says "
                        f"ipc = {source.ipc}")
    provenance = {"name": method.name, "citation": method.citation, "entry": method.path or None, "path": str(path),
                  **dataclasses.asdict(source), "format": shipped.notes["format"], "label_source": label_source,
                  "learned_lr_value": shipped.lr, "reader": {k: v for k, v in shipped.notes.items() if k != "format"},
                  "dtype": str(shipped.images.dtype).removeprefix("torch."),
                  "fkd": None if fkd_manifest is None else {k: fkd_manifest[k] for k in ("config", "label_hash",
                                                                                          "label_bytes")}}
    manifest = {"method": method.name, "ipc": int(counts.min()), "seed": None, "num_images": len(labels),
                "files": shipped.files,
                "images_hash": artifacts.hash_file_map(shipped.files), "image_bytes": shipped.image_bytes,
                "seconds": {}, "source": provenance}
    return ExternalSet(ImageBank(images, labels), manifest, label_source, logits, shipped.lr, fkd_store, fkd_manifest,
                       zca)
