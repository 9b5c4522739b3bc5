"""One readable training loop for the teacher (squeeze) and every student (post-train).

Images arrive as uint8 batches of the working size; on the device they become [0, 1] floats, go
through the batch augmentation (crop, flip, mixing; augment.py), are normalised, and the model
learns from whatever targets the label source gives (hard labels, online KD, stored soft labels).
All settings come from a `TrainRecipe`; every random choice comes from generators seeded here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from cdabench import artifacts, progress
from cdabench.engine.augment import to_unit
from cdabench.engine.runtime import ProcessGroup, autocast
from cdabench.schema import TrainRecipe


class Normalizer:
    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std


class ImageBank:
    """Training images held in memory as one tensor (N, C, S, S): uint8, or float32 pixel-space
    values in [0, 1] units (distilled sets shipped as tensors). Distilled sets and small real sets.
    Gives batches in a given order, and images by index (for stored-label replay)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype not in (torch.uint8, torch.float32) or images.ndim != 4:
            raise ValueError("ImageBank wants uint8 or float32 pixel-space images of shape (N, C, H, W)")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[start:start + batch_size])
            yield self.images[idx], self.labels[idx], idx


class StreamedImages:
    """Training images decoded on the fly by DataLoader workers (the full real set of a large
    dataset, when the prepared cache is off): an ImageSplit whose transform already yields uint8
    tensors of the working size. The workers persist across epochs (one loader per batch size;
    each epoch's order is handed to them through a mutable sampler), and batches are pinned for
    non-blocking copies to a GPU."""

    def __init__(self, split, workers: int = 4):
        self.split, self.workers = split, workers
        self.labels = torch.as_tensor(np.asarray(split.targets)).long()
        self._loaders: dict[int, tuple[torch.utils.data.DataLoader, _OrderSampler]] = {}

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, order: np.ndarray, batch_size: int):
        if batch_size not in self._loaders:
            sampler = _OrderSampler()
            loader = torch.utils.data.DataLoader(
                _Indexed(self.split), batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                pin_memory=torch.cuda.is_available(), persistent_workers=self.workers > 0)
            self._loaders[batch_size] = (loader, sampler)
        loader, sampler = self._loaders[batch_size]
        sampler.order = order.tolist()
        yield from loader


class _OrderSampler(torch.utils.data.Sampler):
    """Yields whatever order was set last (read when an epoch's iteration starts)."""

    def __init__(self):
        self.order: list[int] = []

    def __iter__(self):
        return iter(list(self.order))

    def __len__(self) -> int:
        return len(self.order)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        image, label = self.split[i]
        return image, label, i


def param_groups(model: nn.Module, recipe: TrainRecipe) -> list[dict]:
    if not recipe.decay_matrices_only:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": recipe.weight_decay}]
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe)
    # The fused kernels do the same update in one pass over the parameters: on this 2-core CPU the
    # AdamW step of a ResNet-18 drops from 34 ms to 6 ms (15 % of a post-train step at 8 px).
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=recipe.lr, fused=True)


def lr_at(recipe: TrainRecipe, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up from warmup_start x lr over warmup_epochs, then cosine to 0 (per step)."""
    warmup = recipe.warmup_epochs * steps_per_epoch
    total = recipe.epochs * steps_per_epoch
    if step < warmup:
        return recipe.lr * (recipe.warmup_start + (1 - recipe.warmup_start) * step / warmup)
    if recipe.schedule == "constant":
        return recipe.lr
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate_model(model: nn.Module, source, normalizer: Normalizer, device: torch.device,
                   batch_size: int = 500, precision: str = "fp32") -> dict:
    """Top-1 and top-5 accuracy (%) on an ImageBank / StreamedImages, no augmentation."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    for x_uint8, y, _ in source.batches(np.arange(len(source)), batch_size):
        x = normalizer(to_unit(x_uint8, device))
        y = y.to(device)
        with autocast(device, precision):
            logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    model.train(was_training)
    n = max(1, len(source))
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    teacher_forwards: int = 0


def rank_rows(n: int, group: ProcessGroup) -> slice:
    """This rank's contiguous share of a global batch of n images (np.array_split's sizes)."""
    base, extra = divmod(n, group.world)
    start = group.rank * base + min(group.rank, extra)
    return slice(start, start + base + (1 if group.rank < extra else 0))


def take_rows(target, rows: slice):
    """Rows of a label source's target: a tensor, or a tuple of tensors (mixed hard labels)."""
    if isinstance(target, tuple):
        return tuple(take_rows(t, rows) for t in target)
    return target[rows]


def prepare_rows(labels, x, y, idx, epoch, rng, data, rows: slice):
    """Inputs and targets of the global batch's `rows` only. Every rank augments the whole global
    batch with the same generator (cheap next to the forward pass) and keeps its rows, so the
    ranks' views together are exactly one process's views; a source with its own `prepare_rows`
    (online KD) runs its teacher on these rows alone."""
    if hasattr(labels, "prepare_rows"):
        return labels.prepare_rows(x, y, idx, epoch, rng, data, rows)
    inputs, target = labels.prepare(x, y, idx, epoch, rng, data)
    return inputs[rows], take_rows(target, rows)


def train_step(model, optimizer, labels, normalizer, device, x_uint8, y, idx, epoch, rng, data,
               precision: str = "fp32", group: ProcessGroup = ProcessGroup()) -> torch.Tensor:
    """One optimiser step: augment + target (from the label source), forward, loss, backward.
    With several ranks (`model` wrapped in DistributedDataParallel) this rank's rows of the global
    batch; its loss is weighted by its share of the global batch, so that DDP's gradient mean is
    the gradient of the global batch's mean loss. Returns this rank's mean loss."""
    x = to_unit(x_uint8, device)
    if group.world == 1:
        inputs, target = labels.prepare(x, y.to(device), idx, epoch, rng, data)
        weight = 1.0
    else:
        rows = rank_rows(len(y), group)
        inputs, target = prepare_rows(labels, x, y.to(device), idx, epoch, rng, data, rows)
        weight = (rows.stop - rows.start) * group.world / len(y)
    inputs = normalizer(inputs)
    if device.type == "cuda":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        logits = model(inputs)
    loss = labels.loss(logits.float(), target)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
    optimizer.step()
    return loss.detach()


def _save_checkpoint(path: Path, model, optimizer, rng, epoch: int, step: int, result: TrainResult) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": torch.tensor(epoch), "step": torch.tensor(step)}
    artifacts.save_state_dict(path, state)
    artifacts.atomic_write_json(path.with_suffix(".json"), {
        "rng": rng.bit_generator.state, "history": result.history, "seconds": result.seconds,
        "teacher_forwards": result.teacher_forwards})


def _load_checkpoint(path: Path, model, optimizer, rng, result: TrainResult) -> tuple[int, int]:
    state = artifacts.load_state_dict(path)
    side = artifacts.read_json(path.with_suffix(".json"))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = side["rng"]
    result.history, result.seconds = side["history"], side["seconds"]
    result.teacher_forwards = side["teacher_forwards"]
    return int(state["epoch"]), int(state["step"])


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: everything trained after that point is meaningless."""


def train_model(model: nn.Module, data, labels, recipe: TrainRecipe, normalizer: Normalizer,
                device: torch.device, seed: int, image_size: int, description: str = "train",
                on_epoch=None, checkpoint: Path | None = None, checkpoint_seconds: float = 60.0,
                precision: str = "fp32", group: ProcessGroup = ProcessGroup()) -> TrainResult:
    """Train `model` in place for recipe.epochs; `labels` is a label source (distill/labels.py)
    that decides the epoch order, the augmentation parameters and the loss.
    `on_epoch(entry, model)` is called after every epoch with a copy of its history entry (epoch,
    mean loss, lr); it may log it, and may return more metrics to keep in the history (a held-out
    top-1: the cell's curve, evaluate/posttrain.py).
    `precision`: "fp32", or "bf16" for the forward passes under autocast (the loss stays fp32).
    With `checkpoint`, the state (model, optimiser, generator, history) is saved atomically at
    most every `checkpoint_seconds`, and a killed run resumes from the last saved epoch.

    With several ranks in `group` (every rank calls this), the model is wrapped in
    DistributedDataParallel and each rank trains on its share of every global batch of
    recipe.batch_size: the same epoch order, augmentation, optimiser steps and schedule as one
    process (the generator is the same on every rank). BatchNorm statistics are per rank (plain
    DDP, as the SRe2L/CDA reference code trains), so only BN-free models match one process to
    rounding; a global batch with fewer images than ranks (an epoch's last) is skipped. Rank 0
    alone writes the checkpoint."""
    rng = np.random.default_rng([seed, 0xA11CE])
    optimizer = make_optimizer(model, recipe)
    steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
    result, step, first_epoch = TrainResult(), 0, 0
    if checkpoint is not None and group.broadcast(checkpoint.exists()):
        first_epoch, step = _load_checkpoint(checkpoint, model, optimizer, rng, result)
    net = model
    if group.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    start, last_save = time.perf_counter() - result.seconds, time.perf_counter()
    teacher_forwards_before = result.teacher_forwards
    model.train()
    with progress.track(description, recipe.epochs - first_epoch) as bar:
        for epoch in range(first_epoch, recipe.epochs):
            total_loss, seen = torch.zeros((), device=device), 0
            order = labels.epoch_order(epoch, len(data), rng)
            if len(order) % recipe.batch_size == 1 and len(order) > 1:
                # A last batch of one image breaks BatchNorm on 1x1 maps (ResNets at 8 px); the
                # order is reshuffled every epoch, so dropping it excludes no image for good.
                order = order[:-1]
            for x_uint8, y, idx in data.batches(order, recipe.batch_size):
                lr = lr_at(recipe, step, steps_per_epoch)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                step += 1
                if len(y) < group.world:  # a rank without images would stall DDP's gradient exchange
                    continue
                loss = train_step(net, optimizer, labels, normalizer, device, x_uint8, y, idx, epoch, rng, data,
                                  precision, group)
                local = len(y) if group.world == 1 else rank_rows(len(y), group).stop - rank_rows(len(y), group).start
                total_loss += loss * local
                seen += local
            if group.world > 1:
                total_loss, seen = group.sum(torch.stack([total_loss, torch.tensor(float(seen), device=device)]))
            entry = {"epoch": epoch + 1, "loss": (total_loss / max(1, seen)).item(), "lr": lr}
            if not math.isfinite(entry["loss"]):
                raise TrainingDiverged(
                    f"{description}: the mean loss of epoch {epoch + 1} is {entry['loss']} (precision {precision}, "
                    f"lr {recipe.lr}): training diverged and nothing was kept. With bf16 on a CPU, oneDNN can "
                    "return non-finite weight gradients for tiny convolutions (e.g. a 3x3 stride-2 convolution on "
                    "a 1x1 map, as timm's test_resnet has at 8 px); use --precision fp32, a model adapted to the "
                    "image size, or a smaller learning rate")
            if on_epoch is not None:
                entry.update(on_epoch(dict(entry), model) or {})
            result.history.append(entry)
            bar.advance(1, f"loss {entry['loss']:.4f}")
            result.seconds = time.perf_counter() - start
            result.teacher_forwards = teacher_forwards_before + getattr(labels, "teacher_forwards", 0)
            if checkpoint is not None and group.is_main and epoch + 1 < recipe.epochs and \
                    time.perf_counter() - last_save >= checkpoint_seconds:
                _save_checkpoint(checkpoint, model, optimizer, rng, epoch + 1, step, result)
                last_save = time.perf_counter()
    if group.world > 1:  # every rank's teacher forwards (online KD labels each rank's rows)
        mine = torch.tensor(float(result.teacher_forwards - teacher_forwards_before), device=device)
        result.teacher_forwards = teacher_forwards_before + int(group.sum(mine).item())
    if checkpoint is not None and group.is_main:
        checkpoint.unlink(missing_ok=True)
        checkpoint.with_suffix(".json").unlink(missing_ok=True)
    return result
