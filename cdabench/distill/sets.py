"""Distilled sets: `distill` makes one (squeeze -> recover, or a selection baseline) with its
manifest, writing only atomically and reusing whatever finished work it finds (teacher cache,
recover shards); `load_distilled` reads one back (ours, or any ImageFolder such as the official
releases) for evaluation."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from cdabench import artifacts, progress
from cdabench.config import ConfigError, load_method, recover_config, split_settings
from cdabench.data import DataError, load_imagefolder
from cdabench.data.resources import check_free_memory, check_images_on_disk
from cdabench.distill.recover import image_relpath, run_recover
from cdabench.distill.select import select_herding, select_random
from cdabench.distill.squeeze import Teacher, get_teacher
from cdabench.engine.context import Context, check_ipc, eval_transform
from cdabench.engine.runtime import device_description, versions
from cdabench.engine.train import ImageBank

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
            teacher_path: str | None = None, command: str = "", teacher: Teacher | None = None) -> dict:
    """`teacher`: one already loaded and guarded (a suite passes its own, so it is not reloaded
    and re-checked for every set)."""
    method = load_method(method_name)
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
