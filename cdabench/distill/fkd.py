"""FKD soft-label directories, as SRe2L/CDA/D4M's `generate_soft_label.py` writes them, imported
into our label store (engine/labels.py) and replayed by `StoredLabels`, the same code that replays
our own stores: no patching of PyTorch's DataLoader.

The directory holds `epoch_<e>/batch_<b>.tar`, each a list
[coords, flip, mix_index, mix_lam, mix_bbox, logits]: per image the RandomResizedCrop box as
fractions (top / H, left / W, h / H, w / W) and the flip; per batch the mixing partner (a batch
position), the weight and the CutMix box (rows x1:x2, columns y1:y2 of the relabel input) or
None; and the teacher's (fp16) logits on the mixed batch. G-VBSM appends the dataset indices of
the batch (a 7th element, used when present). The images of batch b of epoch e are the ones the
relabel script's sampler gave: torchvision's ImageFolder order over the image folder (folder names
sorted as strings: D4M's `10/` comes before `2/`), drawn by one RandomSampler seeded `seed` (42)
whose permutations continue from epoch to epoch, in batches of the relabel batch size (the size
of batch 0).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torchvision

from cdabench import artifacts, progress
from cdabench.data import DataError
from cdabench.distill.formats import NUMPY_SCALAR_GLOBALS, load_tensor_file
from cdabench.engine.labels import empty_epoch, write_epoch

_EPOCH = re.compile(r"^epoch_(\d+)$")
_BATCH = re.compile(r"^batch_(\d+)\.tar$")


def fkd_files(fkd_dir: Path) -> list[list[Path]]:
    """[epoch][batch] -> the batch file, both in numeric order; gaps are refused."""
    fkd_dir = Path(fkd_dir)
    if not fkd_dir.is_dir():
        raise DataError(f"FKD soft-label directory {fkd_dir} does not exist (expected epoch_<e>/batch_<b>.tar)")
    epochs = sorted((int(m.group(1)), p) for p in fkd_dir.iterdir() if (m := _EPOCH.match(p.name)) and p.is_dir())
    if not epochs or [e for e, _ in epochs] != list(range(len(epochs))):
        raise DataError(f"{fkd_dir} must hold epoch_0, epoch_1, ... without gaps (found {[e for e, _ in epochs][:5]})")
    table = []
    for e, folder in epochs:
        batches = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _BATCH.match(p.name)))
        if not batches or [b for b, _ in batches] != list(range(len(batches))):
            raise DataError(f"{folder} must hold batch_0.tar, batch_1.tar, ... without gaps")
        table.append([p for _, p in batches])
    return table


def relabel_order(root: Path) -> list[Path]:
    """The image files in the order the relabel script's torchvision ImageFolder numbers them."""
    _, class_to_idx = torchvision.datasets.folder.find_classes(str(root))
    samples = torchvision.datasets.folder.make_dataset(str(root), class_to_idx,
                                                       extensions=torchvision.datasets.folder.IMG_EXTENSIONS)
    return [Path(path) for path, _ in samples]


def sampler_orders(n: int, epochs: int, seed: int) -> list[list[int]]:
    """The RandomSampler(generator seeded `seed`) permutations of epochs 0..E-1, in sequence."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(n), generator=generator)
    return [list(sampler) for _ in range(epochs)]


def _batch(path: Path) -> list:
    batch = load_tensor_file(path, "FKD label file", NUMPY_SCALAR_GLOBALS)
    if not isinstance(batch, (list, tuple)) or len(batch) not in (6, 7):
        size = len(batch) if isinstance(batch, (list, tuple)) else type(batch).__name__
        raise DataError(f"{path} holds {size} elements; an FKD label file is the list [coords, flip, mix_index, mix_lam, "
                        "mix_bbox, logits] (SRe2L/CDA/D4M), or with the batch's dataset indices appended (G-VBSM). "
                        "Other layouts (e.g. EDC's patch order) are not supported")
    return list(batch)


def mix_kind(batch: list) -> str:
    if batch[2] is None:
        return "none"
    return "mixup" if batch[4] is None else "cutmix"


def import_fkd(fkd_dir: Path, image_paths: list[Path], image_root: Path, image_size: int, input_size: int,
               seed: int, cache: Path) -> tuple[Path, dict]:
    """Convert the FKD directory for the set whose images (in our bank's order) are `image_paths`
    into a label store under `cache`; returns (store root, its manifest). Boxes are scaled from the
    relabel input (`input_size` px; crops are fractions) to `image_size` and rounded to whole pixels."""
    table = fkd_files(fkd_dir)
    hashes = {p.relative_to(fkd_dir).as_posix(): artifacts.sha256_file(p) for epoch in table for p in epoch}
    bank_index = {Path(p).resolve(): i for i, p in enumerate(image_paths)}
    try:
        tv_to_bank = np.asarray([bank_index[p.resolve()] for p in relabel_order(image_root)])
    except KeyError as exc:
        raise DataError(f"{image_root} holds an image the set does not ({exc}): the FKD labels index the folder's "
                        "images in torchvision ImageFolder order, so the folder must hold exactly the set") from exc
    n = len(image_paths)
    if len(tv_to_bank) != n:
        raise DataError(f"torchvision's ImageFolder finds {len(tv_to_bank)} images in {image_root}, the set has {n}")
    key = artifacts.hash_config({"fkd": artifacts.hash_file_map(hashes), "images": [str(Path(p).relative_to(image_root))
                                 for p in image_paths], "size": image_size, "input_size": input_size, "seed": seed})
    root = Path(cache) / "labels" / f"fkd-{key}"
    if (root / "labels.json").exists():
        return root, artifacts.read_json(root / "labels.json")
    first = _batch(table[0][0])
    batch_size = len(first[0])
    counts = [len(_batch(p)[0]) for p in table[0]] if len(table[0]) > 1 else [batch_size]
    if sum(counts) != n:
        raise DataError(f"epoch_0 of {fkd_dir} labels {sum(counts)} images but the set has {n}: it belongs to another set")
    orders = sampler_orders(n, len(table), seed)
    mix = mix_kind(first)
    scale = image_size / input_size
    with progress.track("import FKD labels", len(table)) as bar:
        for e, batches in enumerate(table):
            order = torch.from_numpy(tv_to_bank[np.asarray(orders[e])])
            record = empty_epoch(n)
            boxes, flips, partner, lam, mix_boxes = (record[k] for k in ("boxes", "flips", "partner", "lam",
                                                                          "mix_boxes"))
            logits_all = None
            for b, path in enumerate(batches):
                batch = _batch(path)
                coords, flip, mix_index, mix_lam, bbox, logits = batch[:6]
                if len(batch) == 7:   # G-VBSM: the batch's dataset indices, as stored
                    idx = torch.from_numpy(tv_to_bank[torch.as_tensor(batch[6]).long().numpy()])
                else:
                    idx = order[b * batch_size:b * batch_size + len(coords)]
                if len(idx) != len(coords) or len(logits) != len(coords):
                    raise DataError(f"{path}: {len(coords)} crops and {len(logits)} logits, but the relabel sampler gives "
                                    f"{len(idx)} images to this batch (relabel batch size {batch_size}, seed {seed})")
                if logits_all is None:
                    logits_all = torch.zeros((n, logits.shape[1]), dtype=torch.float16)
                c = torch.as_tensor(coords, dtype=torch.float64) * image_size
                top, left = c[:, 0].round().long(), c[:, 1].round().long()
                h = c[:, 2].round().long().clamp(1, image_size)
                w = c[:, 3].round().long().clamp(1, image_size)
                boxes[idx] = torch.stack([torch.minimum(top.clamp(min=0), image_size - h),
                                           torch.minimum(left.clamp(min=0), image_size - w), h, w], 1).short()
                flips[idx] = torch.as_tensor(flip).bool().reshape(-1)
                if mix_index is not None:
                    partner[idx] = idx[torch.as_tensor(mix_index).long()].int()
                    lam[idx] = float(mix_lam)
                    if bbox is not None:
                        x1, y1, x2, y2 = (round(float(v) * scale) for v in bbox)
                        mix_boxes[idx] = torch.tensor([x1, y1, x2 - x1, y2 - y1], dtype=torch.int16)
                logits_all[idx] = torch.as_tensor(logits).half()
            record = {"order": order.int(), **record, "logits": logits_all}
            write_epoch(root, e, record)
            bar.advance(1)
    manifest = {"config": {"epochs": len(table), "batch_size": batch_size, "seed": seed, "mix": mix,
                           "input_size": input_size, "source": "fkd"},
                "num_images": n, "files": hashes, "label_hash": artifacts.hash_file_map(hashes),
                "label_bytes": sum((Path(fkd_dir) / rel).stat().st_size for rel in hashes), "teacher_forwards": 0,
                "seconds": 0.0}
    artifacts.atomic_write_json(root / "labels.json", manifest)
    return root, manifest
