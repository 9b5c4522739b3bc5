"""Recover: synthesise images from noise by matching the frozen teacher's BN statistics.

One loop serves SRe2L and CDA; they differ only in the `CropSchedule` (methods.md sections 2-3).
Work is cut into shards (a chunk of classes x a group of IPC indices). Each shard has its own
seed, derived from the run seed and the shard's identity, so its images do not depend on which
process ran it, in what order, or whether the run was interrupted: a killed run resumes by
skipping the shards whose marker file exists, and gives byte-identical images.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdabench import artifacts, progress
from cdabench.augment import crop_resize, sample_crop_box
from cdabench.distill.bn_loss import BNStatisticsLoss
from cdabench.runtime import ProcessGroup, autocast
from cdabench.schema import RecoverConfig


@dataclass(frozen=True)
class Shard:
    """One batch of synthetic images: classes[c] x ipc indices, interleaved (class fastest)."""

    chunk: int
    group: int
    classes: tuple[int, ...]
    ipc_indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"c{self.chunk:04d}_g{self.group:04d}"

    @property
    def labels(self) -> list[int]:
        return [c for _ in self.ipc_indices for c in self.classes]

    @property
    def slots(self) -> list[tuple[int, int]]:
        return [(c, k) for k in self.ipc_indices for c in self.classes]


def plan_shards(num_classes: int, ipc: int, batch_size: int) -> list[Shard]:
    """Batches of one image per class for a chunk of classes (ImageNet: 100 classes per batch).
    With fewer classes than the batch size, a batch holds batch_size // classes IPC indices of
    every class, since BN statistics over e.g. 10 images are too noisy."""
    if num_classes >= batch_size:
        chunk_size, per_batch = batch_size, 1
    else:
        chunk_size, per_batch = num_classes, max(1, batch_size // num_classes)
    shards = []
    for chunk, start in enumerate(range(0, num_classes, chunk_size)):
        classes = tuple(range(start, min(num_classes, start + chunk_size)))
        for group, k0 in enumerate(range(0, ipc, per_batch)):
            shards.append(Shard(chunk, group, classes, tuple(range(k0, min(ipc, k0 + per_batch)))))
    return shards


def shard_seed(seed: int, shard: Shard) -> int:
    digest = hashlib.sha256(f"{seed}:{shard.chunk}:{shard.group}:{shard.classes}:{shard.ipc_indices}".encode())
    return int(digest.hexdigest()[:15], 16)


def cosine_lr(base_lr: float, t: int, total: int) -> float:
    """Cosine from base_lr at t=0 towards 0 at t=total, no warm-up."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t / total))


def pixel_bounds(mean, std, clamp_to: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    if clamp_to == "unit":
        return torch.zeros_like(mean), torch.ones_like(mean)
    return (0 - mean) / std, (1 - mean) / std


def to_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Denormalise, clamp to [0, 1], x255 and truncate (as PIL's conversion of the official code)."""
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1).mul(255).to(torch.uint8).cpu()


def recover_batch(teacher: nn.Module, labels: list[int], config: RecoverConfig, seed: int,
                  shape: tuple[int, int, int], mean, std, device: torch.device,
                  on_step=None) -> tuple[torch.Tensor, dict]:
    """Optimise one batch of images from N(0, 1) noise; returns uint8 (B, C, H, W) and loss stats.
    The teacher must be frozen (eval mode, no parameter gradients): only the images learn."""
    freeze(teacher)
    channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.randn((len(labels), channels, height, width), generator=generator).to(device).requires_grad_(True)
    y = torch.tensor(labels, device=device)
    low, high = pixel_bounds(mean, std, config.clamp_to, device)
    optimizer = torch.optim.Adam([x], lr=config.lr, betas=(0.5, 0.9), eps=1e-8)
    ce = nn.CrossEntropyLoss()
    stats = {}
    with BNStatisticsLoss(teacher, config.first_bn_multiplier) as bn_loss:
        for t in range(config.iterations):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.lr, t, config.iterations)
            # One crop box and one flip decision shared by the whole batch, then roll jitter.
            view = x
            if config.crop.crops:
                box = sample_crop_box(rng, height, width, config.crop.scale(t, config.iterations))
                view = crop_resize(x, torch.tensor([box] * len(labels)), (height, width))
            if config.flip and rng.random() < 0.5:
                view = view.flip(-1)
            if config.jitter > 0:
                low_j = -config.jitter if config.jitter_symmetric else 0
                dy, dx = (int(v) for v in rng.integers(low_j, config.jitter + 1, size=2))
                view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
            with autocast(device, config.precision or "fp32"):
                logits = teacher(view)
            loss_ce = ce(logits.float(), y)
            loss_bn = bn_loss.value()
            loss = loss_ce + config.r_bn * loss_bn
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            if on_step is not None:
                on_step(t, loss_ce.detach(), loss_bn.detach())  # tensors: reading them syncs a GPU
        if config.iterations > 0:
            stats = {"final_ce": float(loss_ce.item()), "final_bn": float(loss_bn.item())}
    return to_uint8(x.detach(), mean, std), stats


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def image_relpath(folder: str, ipc_index: int, fmt: str) -> str:
    return f"{folder}/ipc{ipc_index:04d}{artifacts.image_suffix(fmt)}"


def run_recover(teacher: nn.Module, out: Path, class_folders: list[str], ipc: int, config: RecoverConfig,
                seed: int, shape: tuple[int, int, int], mean, std, device: torch.device,
                group: ProcessGroup = ProcessGroup(), stop_after: int | None = None) -> dict:
    """Recover every shard not yet finished under `out` (this rank's share of them).
    Images go to out/images/<class folder>/ipcNNNN.png, one marker per finished shard to
    out/shards/<name>.json (written last, atomically). Returns {shard name: marker} for all shards
    when every rank is done. `stop_after` stops after that many shards (tests of resuming)."""
    freeze(teacher)
    shards = plan_shards(len(class_folders), ipc, config.batch_size)
    mine = [s for i, s in enumerate(shards) if i % group.world == group.rank]
    todo = [s for s in mine if not (out / "shards" / f"{s.name}.json").exists()]
    done_here = 0
    with progress.track(f"recover (rank {group.rank})" if group.world > 1 else "recover",
                        len(todo) * config.iterations) as bar:
        for shard in todo:
            start = time.perf_counter()
            def on_step(t, ce, bn):
                info = f"{shard.name} ce {ce.item():.3f} bn {bn.item():.3f}" if t % 50 == 0 else ""
                bar.advance(1, info)
            images, stats = recover_batch(teacher, shard.labels, config, shard_seed(seed, shard), shape,
                                          mean, std, device, on_step)
            files = {}
            for image, (cls, k) in zip(images, shard.slots):
                rel = image_relpath(class_folders[cls], k, config.image_format)
                data = artifacts.encode_image(image, config.image_format)
                artifacts.atomic_write_bytes(out / "images" / rel, data)
                files[rel] = artifacts.sha256_bytes(data)
            marker = {"shard": shard.name, "seed": shard_seed(seed, shard), "files": files,
                      "seconds": time.perf_counter() - start, **stats}
            artifacts.atomic_write_json(out / "shards" / f"{shard.name}.json", marker)
            done_here += 1
            if stop_after is not None and done_here >= stop_after:
                raise KeyboardInterrupt(f"stopped after {done_here} shard(s) as asked")
    group.barrier()
    return {s.name: artifacts.read_json(out / "shards" / f"{s.name}.json") for s in shards}
