"""Recover: synthesise images from noise by matching the frozen teacher's BN statistics.

One loop serves SRe2L and CDA; they differ only in the `CropSchedule` (methods.md sections 2-3).
Work is cut into shards (a chunk of classes x a group of IPC indices). Each shard has its own
seed, derived from the run seed and the shard's identity, so its images do not depend on which
process ran it, in what order, or whether the run was interrupted: a killed run resumes by
skipping the shards whose marker file exists, and gives byte-identical images (on CPU, one shard
per forward; docs/recover.md says what holds elsewhere).

The engine (docs/recover.md): every iteration's crop box, flip and roll offsets are sampled up
front from the shard's generator (`sample_recover_draws`, the same stream in the same order as a
loop drawing them as it goes), so the loop does no host work; K shards can run as one batch of
K x B images through the frozen teacher (`recover_shards`), each with its own statistics, loss,
crop, flip and roll: the images do not interact in an eval-mode forward, so each step computes
what the shard alone would, to float rounding (over a long run such rounding differences grow:
docs/recover.md, Determinism).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdabench import artifacts, progress
from cdabench.distill.bn_loss import BNStatisticsLoss
from cdabench.engine.augment import crop_resize, sample_crop_box
from cdabench.engine.runtime import ProcessGroup, autocast, check_precision
from cdabench.schema import RecoverConfig

MAX_AUTO_SHARDS = 8       # beyond this a GPU gains little from a larger batch (docs/recover.md)
PROGRESS_EVERY = 50       # iterations between progress lines that read the losses (a device sync)


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass
class RecoverDraws:
    """Every iteration's augmentation parameters of one shard, sampled before the loop.
    boxes: (T, 4) int64 crop boxes (top, left, h, w), the whole image when the schedule does not
    crop; flips: (T,) bool; shifts: (T, 2) int64 roll offsets (dy, dx), zeros without jitter."""

    boxes: torch.Tensor
    flips: torch.Tensor
    shifts: torch.Tensor


def sample_recover_draws(config: RecoverConfig, seed: int, height: int, width: int) -> RecoverDraws:
    """The shard's stream from `np.random.default_rng(seed)`, per iteration in this order: the crop
    box (if the schedule crops), the flip (if `flip`), the two roll offsets (if `jitter` > 0)."""
    if config.crop is None:
        raise ValueError("RecoverConfig.crop is None: resolve it with config.recover_config(task, method) "
                         "or pass a CropSchedule (CropSchedule('none') for no crop)")
    rng = np.random.default_rng(seed)
    total = config.iterations
    boxes = np.tile(np.array([0, 0, height, width], dtype=np.int64), (total, 1))
    flips = np.zeros(total, dtype=bool)
    shifts = np.zeros((total, 2), dtype=np.int64)
    low = -config.jitter if config.jitter_symmetric else 0
    for t in range(total):
        if config.crop.crops:
            boxes[t] = sample_crop_box(rng, height, width, config.crop.scale(t, total))
        if config.flip:
            flips[t] = rng.random() < 0.5
        if config.jitter > 0:
            shifts[t] = rng.integers(low, config.jitter + 1, size=2)
    return RecoverDraws(torch.from_numpy(boxes), torch.from_numpy(flips), torch.from_numpy(shifts))


def initial_noise(seed: int, n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The start point: N(0, 1) in the normalised space, from the shard's own torch generator (CPU)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    """cuDNN picks the fastest convolution algorithms for recover's fixed shapes (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class _ShardViews:
    """The teacher's input at iteration t: each shard's crop-resize, flip and roll of its images.
    Boxes live on the device (moved once); flips and offsets are host lists, so the choices are
    Python branches and no value is read back from the device."""

    def __init__(self, draws: list[RecoverDraws], config: RecoverConfig, batch: int,
                 size: tuple[int, int], device: torch.device, channels_last: bool):
        self.shards, self.batch, self.size = len(draws), batch, size
        self.crops = config.crop.crops
        self.roll = config.jitter > 0
        # (T, K, 4) on the device, moved once; each shard's box serves its B images (the official
        # loop crops a batch with one box).
        self.boxes = torch.stack([d.boxes for d in draws], 1).to(device) if self.crops else None
        self.flips = [d.flips.tolist() for d in draws]
        self.shifts = [[tuple(s) for s in d.shifts.tolist()] for d in draws]
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.crops:   # expand, not repeat_interleave: no size computed from device values
            boxes = self.boxes[t][:, None, :].expand(self.shards, self.batch, 4).reshape(-1, 4)
            view = crop_resize(x, boxes, self.size)
        else:
            view = x
        parts = view.split(self.batch) if self.shards > 1 else [view]
        out = []
        for k, part in enumerate(parts):
            if self.flips[k][t]:
                part = part.flip(-1)
            if self.roll:
                part = torch.roll(part, shifts=self.shifts[k][t], dims=(2, 3))
            out.append(part)
        view = torch.cat(out) if self.shards > 1 else out[0]
        return view.contiguous(memory_format=torch.channels_last) if self.channels_last else view


def use_channels_last(device: torch.device, precision: str) -> bool:
    """Channels-last input (the teacher's convolutions follow it) on CUDA, and for bf16 on a CPU
    (oneDNN's fast bf16 path: 1.24 s vs 1.68 s a ResNet-18 step, machine-performance.md). Not for
    fp32 on a CPU, which keeps the byte-identical results of the plain layout."""
    return device.type == "cuda" or precision == "bf16"


class _TeacherWithBNLoss(nn.Module):
    """The teacher's forward and its BN-statistics loss as one module, so torch.compile traces
    both: the hooks and the loss run inside one compiled graph (no graph break)."""

    def __init__(self, teacher: nn.Module, bn_loss: BNStatisticsLoss):
        super().__init__()
        self.teacher = teacher
        self.bn_loss = bn_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.teacher(x), self.bn_loss.value()


class RecoverForward:
    """`(view, shards) -> (logits, BN loss)` of the frozen teacher, made once per recover run.
    The BN hooks are registered once, and with `compile` the hooked forward is compiled once, so
    dynamo's guards hold from one shard group to the next (new hook objects per group would
    recompile every time, and after `torch._dynamo.config.cache_size_limit` recompiles dynamo
    silently runs eager). The first compiled call compiles forward and backward on a copy of its
    input; if compilation fails here (no C++ compiler, an unsupported device), it warns once and
    the run goes on eager. `compiled` says which ran."""

    def __init__(self, teacher: nn.Module, config: RecoverConfig, device: torch.device):
        freeze(teacher)
        self.bn_loss = BNStatisticsLoss(teacher, config.first_bn_multiplier, 1, fused=device.type == "cuda")
        self.module = _TeacherWithBNLoss(teacher, self.bn_loss)
        self.compiled = config.compile
        self._forward = torch.compile(self.module) if config.compile else self.module
        self._tried = False

    def __call__(self, view: torch.Tensor, shards: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.bn_loss.shards = shards      # a guard of the compiled graph: a new K recompiles once
        if self.compiled and not self._tried:
            self._tried = True
            self._try_compile(view)
        return self._forward(view)

    def _try_compile(self, view: torch.Tensor) -> None:
        start = time.perf_counter()
        progress.log("recover: compiling the teacher (torch.compile; a minute the first time)")
        probe = view.detach().clone().requires_grad_(True)
        try:
            logits, loss_bn = self._forward(probe)
            (logits.float().sum() + loss_bn.sum()).backward()
        except Exception as error:   # any compiler failure: the eager forward computes the same
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            warnings.warn(f"torch.compile of the recover teacher failed here ({type(error).__name__}: "
                          f"{first_line}); recover runs eager, which computes the same steps to float rounding. "
                          "Set compile = false in the task's [recover.<method>] table to skip the attempt.",
                          RuntimeWarning, stacklevel=3)
            self.compiled, self._forward = False, self.module
            self.bn_loss.terms = [None] * len(self.bn_loss.layers)
            return
        progress.log(f"recover: compiled in {time.perf_counter() - start:.0f} s")

    def close(self) -> None:
        self.bn_loss.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recover_shards(teacher: nn.Module, labels: list[list[int]], config: RecoverConfig, seeds: list[int],
                   shape: tuple[int, int, int], mean, std, device: torch.device,
                   on_step=None, forward: RecoverForward | None = None) -> list[tuple[torch.Tensor, dict]]:
    """Optimise K shards (K = len(seeds), each `labels[k]`, all of one size) as one K x B batch.
    Returns each shard's uint8 (B, C, H, W) images and final losses, as `recover_batch` of that
    shard alone would (to float rounding; bit for bit when K = 1). The loss is the sum of the
    shards' losses, so each shard's images get exactly their own loss's gradient; Adam and the
    clamp act per pixel. `on_step(t, ce, bn)` gets the detached per-shard losses ((K,) tensors, or
    scalars when K = 1) every iteration; reading them syncs a GPU, so read them rarely.
    `forward`: the run's `RecoverForward` (run_recover makes one for all its shard groups);
    without it one is made for this call, compiled if `config.compile`."""
    if forward is None:
        with RecoverForward(teacher, config, device) as forward:
            return recover_shards(teacher, labels, config, seeds, shape, mean, std, device, on_step, forward)
    shards = len(seeds)
    if shards < 1 or len(labels) != shards:
        raise ValueError(f"need one label list per seed, got {len(labels)} label lists for {shards} seeds")
    batch = len(labels[0])
    if any(len(ls) != batch for ls in labels):
        raise ValueError(f"shards run together need one size, got {sorted({len(ls) for ls in labels})}: "
                         "group shards of equal size (run_recover does)")
    precision = check_precision(config.precision or "fp32", device)
    channels, height, width = shape
    draws = [sample_recover_draws(config, seed, height, width) for seed in seeds]
    views = _ShardViews(draws, config, batch, (height, width), device, use_channels_last(device, precision))
    x = torch.cat([initial_noise(seed, batch, shape) for seed in seeds]).to(device).requires_grad_(True)
    y = torch.tensor([c for ls in labels for c in ls], device=device)
    low, high = pixel_bounds(mean, std, config.clamp_to, device)
    # Fused Adam on a GPU (one kernel); the plain loop on a CPU, bit for bit what it always gave.
    optimizer = torch.optim.Adam([x], lr=config.lr, betas=(0.5, 0.9), eps=1e-8,
                                 fused=True if device.type == "cuda" else None)
    stats: list[dict] = [{} for _ in seeds]
    with _cudnn_benchmark(device):
        for t in range(config.iterations):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.lr, t, config.iterations)
            view = views(x, t)
            with autocast(device, precision):
                logits, loss_bn = forward(view, shards)
            if shards == 1:
                loss_ce = F.cross_entropy(logits.float(), y)
            else:
                loss_ce = F.cross_entropy(logits.float(), y, reduction="none").view(shards, batch).mean(1)
            loss = loss_ce + config.r_bn * loss_bn
            optimizer.zero_grad(set_to_none=True)
            (loss if shards == 1 else loss.sum()).backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            if on_step is not None:
                on_step(t, loss_ce.detach(), loss_bn.detach())
        if config.iterations > 0:   # one read-back at the end
            ce, bn = loss_ce.detach().reshape(-1).tolist(), loss_bn.detach().reshape(-1).tolist()
            stats = [{"final_ce": float(c), "final_bn": float(b)} for c, b in zip(ce, bn)]
    x = x.detach()
    return [(to_uint8(x[k * batch:(k + 1) * batch], mean, std), stats[k]) for k in range(shards)]


def recover_batch(teacher: nn.Module, labels: list[int], config: RecoverConfig, seed: int,
                  shape: tuple[int, int, int], mean, std, device: torch.device,
                  on_step=None) -> tuple[torch.Tensor, dict]:
    """Optimise one batch of images from N(0, 1) noise; returns uint8 (B, C, H, W) and loss stats.
    The teacher must be frozen (eval mode, no parameter gradients): only the images learn."""
    return recover_shards(teacher, [labels], config, [seed], shape, mean, std, device, on_step)[0]


def shard_bytes_probe(teacher: nn.Module, config: RecoverConfig, batch: int, shape: tuple[int, int, int],
                      device: torch.device) -> int:
    """Peak device memory of one shard's recover iteration (CUDA), measured on one real step."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    probe = dataclasses.replace(config, iterations=1, compile=False)   # eager: an upper bound
    recover_shards(teacher, [[0] * batch], probe, [0], shape, (0.0,) * shape[0], (1.0,) * shape[0], device)
    torch.cuda.synchronize(device)
    return max(1, torch.cuda.max_memory_allocated(device) - base)


def resolve_shards_per_forward(teacher: nn.Module, config: RecoverConfig, batch: int,
                               shape: tuple[int, int, int], device: torch.device) -> int:
    """K: the configured value, else 1 on a CPU (compute-bound: K > 1 measured no reliable gain,
    docs/recover.md, and K = 1 keeps bitwise resume) and, on a GPU, as many shards as half the
    free memory holds, at most MAX_AUTO_SHARDS, from one probe iteration's measured peak."""
    if config.shards_per_forward > 0:
        return config.shards_per_forward
    if device.type != "cuda":
        return 1
    per_shard = shard_bytes_probe(teacher, config, batch, shape, device)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_AUTO_SHARDS, int(0.5 * free // per_shard)))


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def image_relpath(folder: str, ipc_index: int, fmt: str) -> str:
    return f"{folder}/ipc{ipc_index:04d}{artifacts.image_suffix(fmt)}"



class ImageWriter:
    """Encodes and writes finished shards on one background thread, so the device starts the next
    shards while PNG/JPEG encoding and fsync run. Writes stay atomic and each shard's marker is
    written after its images, as before; leaving the `with` block waits for every queued shard
    (also on an interrupt, so every recovered shard is kept) and re-raises a writer error."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recover-writer")
        self._pending: list[Future] = []

    def submit(self, fn, *args) -> None:
        self._raise_failed()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        for future in self._pending:
            future.result()
        self._pending.clear()

    def _raise_failed(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def write_shard(out: Path, shard: Shard, images: torch.Tensor, class_folders: list[str], fmt: str,
                marker: dict) -> None:
    """The shard's images, then its marker (the marker says the shard is complete)."""
    files = {}
    for image, (cls, k) in zip(images, shard.slots):
        rel = image_relpath(class_folders[cls], k, fmt)
        data = artifacts.encode_image(image, fmt)
        artifacts.atomic_write_bytes(out / "images" / rel, data)
        files[rel] = artifacts.sha256_bytes(data)
    artifacts.atomic_write_json(out / "shards" / f"{shard.name}.json", {**marker, "files": files})


def group_shards(shards: list[Shard], per_forward: int) -> list[list[Shard]]:
    """Consecutive shards of one size, at most `per_forward` together (a ragged last chunk of
    classes or IPC group runs in its own forward)."""
    groups: list[list[Shard]] = []
    for shard in shards:
        if groups and len(groups[-1]) < per_forward and len(groups[-1][0].labels) == len(shard.labels):
            groups[-1].append(shard)
        else:
            groups.append([shard])
    return groups


def reproducibility(device: torch.device, per_forward: int) -> str:
    """What a rerun of a shard reproduces, recorded in its marker (docs/recover.md)."""
    if device.type == "cpu" and per_forward == 1:
        return "bitwise"       # same seed, same images, byte for byte (and on resume)
    if device.type == "cpu":
        return "float"         # K shards per forward: equal to the shard alone up to float rounding
    return "float-nondeterministic"  # CUDA: the crop-resize backward accumulates with atomics


def run_recover(teacher: nn.Module, out: Path, class_folders: list[str], ipc: int, config: RecoverConfig,
                seed: int, shape: tuple[int, int, int], mean, std, device: torch.device,
                group: ProcessGroup = ProcessGroup()) -> dict:
    """Recover every shard not yet finished under `out` (this rank's share of them).
    Images go to out/images/<class folder>/ipcNNNN.png, one marker per finished shard to
    out/shards/<name>.json (written last, atomically). Returns {shard name: marker} for all shards
    when every rank is done."""
    freeze(teacher)
    shards = plan_shards(len(class_folders), ipc, config.batch_size)
    # Deal the unfinished shards, so a resumed run balances what is left across ranks. Every rank
    # lists them between two barriers: no rank writes a marker before all have listed.
    group.barrier()
    todo = [s for s in shards if not (out / "shards" / f"{s.name}.json").exists()]
    group.barrier()
    mine = todo[group.rank::group.world]
    per_forward = (resolve_shards_per_forward(teacher, config, len(mine[0].labels), shape, device)
                   if mine else 1)
    precision = config.precision or "fp32"
    with RecoverForward(teacher, config, device) as forward, ImageWriter() as writer, progress.track(
            f"recover (rank {group.rank})" if group.world > 1 else "recover", len(mine) * config.iterations) as bar:
        for batch in group_shards(mine, per_forward):
            start = time.perf_counter()
            names = "+".join(s.name for s in batch)

            def on_step(t, ce, bn):
                info = f"{names} ce {ce.mean().item():.3f} bn {bn.mean().item():.3f}" if t % PROGRESS_EVERY == 0 else ""
                bar.advance(len(batch), info)
            results = recover_shards(teacher, [s.labels for s in batch], config,
                                     [shard_seed(seed, s) for s in batch], shape, mean, std, device, on_step, forward)
            seconds = (time.perf_counter() - start) / len(batch)
            for shard, (images, stats) in zip(batch, results):
                marker = {"shard": shard.name, "seed": shard_seed(seed, shard), "seconds": seconds, **stats,
                          "precision": precision, "shards_per_forward": len(batch), "compiled": forward.compiled,
                          "device": device.type, "reproducible": reproducibility(device, len(batch))}
                writer.submit(write_shard, out, shard, images, class_folders, config.image_format, marker)
    group.barrier()
    return {s.name: artifacts.read_json(out / "shards" / f"{s.name}.json") for s in shards}
