"""Relabel: where a student's targets come from.

- `HardLabels`: the class label (mixed by CutMix/Mixup weights when the batch is mixed).
- `OnlineKD`: the frozen teacher labels every augmented batch (Tiny-ImageNet/CIFAR protocol).
- `GivenLogits`: a distilled set's own per-image logits, shipped with it (DATM, DD-Ranking):
  softmax at the method's temperature, mixed with the partner's when the batch is mixed.
- `StoredLabels`: FKD-style soft labels generated once by `build_label_store` and replayed: per
  epoch the image order, each image's crop box and flip, its mixing partner, weight and box, and
  the teacher's fp16 logits (optionally only the top-k). Everything is keyed by image index, so
  the replay is independent of the batch size; our own order + batch assembly replays it (no
  patching of PyTorch's DataLoader).
Every source exposes the same three calls used by train.train_model: `epoch_order`, `prepare`, `loss`.
"""
from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdabench import artifacts, progress
from cdabench.data.resources import check_free_memory, check_free_space
from cdabench.engine.augment import (AugmentSpec, AugParams, apply_mix, apply_view, augment_batch, pad_images,
                              sample_aug_params, to_unit)
from cdabench.engine.runtime import ProcessGroup, autocast


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float, t_squared: bool) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch mean; x T^2 when the protocol says so."""
    loss = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), teacher_probs, reduction="batchmean")
    return loss * temperature ** 2 if t_squared else loss


def mixed_cross_entropy(logits: torch.Tensor, target: tuple) -> torch.Tensor:
    y, y_partner, lam = target
    per_sample = lam * F.cross_entropy(logits, y, reduction="none") + \
        (1 - lam) * F.cross_entropy(logits, y_partner, reduction="none")
    return per_sample.mean()


def masked_probs(logits: torch.Tensor, temperature: float, class_mask: torch.Tensor | None) -> torch.Tensor:
    """Teacher probabilities at temperature T; classes outside `class_mask` get probability 0
    (continual learning: the student must not learn about classes it has not seen yet)."""
    logits = logits.float()
    if class_mask is not None:
        logits = logits.masked_fill(~class_mask.to(logits.device), float("-inf"))
    return F.softmax(logits / temperature, dim=1)


class _AugmentedSource:
    def __init__(self, spec: AugmentSpec, image_size: int):
        self.spec, self.size = spec, image_size

    def epoch_order(self, epoch: int, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(n)

    def _augment(self, x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, AugParams]:
        params = sample_aug_params(rng, x.shape[0], x.shape[-2], x.shape[-1], self.spec)
        return augment_batch(x, params, self.spec, self.size), params


class HardLabels(_AugmentedSource):
    def prepare(self, x, y, idx, epoch, rng, data):
        views, params = self._augment(x, rng)
        partner = params.partner.to(y.device)
        y_partner = torch.where(partner >= 0, y[partner.clamp(min=0)], y)
        return views, (y, y_partner, params.lam.to(views.device))

    def loss(self, logits, target):
        return mixed_cross_entropy(logits, target)


class OnlineKD(_AugmentedSource):
    def __init__(self, spec: AugmentSpec, image_size: int, teacher: nn.Module, normalizer, temperature: float,
                 t_squared: bool, class_mask: torch.Tensor | None = None, precision: str = "fp32"):
        super().__init__(spec, image_size)
        self.precision = precision
        self.teacher, self.normalizer = teacher.eval(), normalizer
        self.temperature, self.t_squared, self.class_mask = temperature, t_squared, class_mask
        self.teacher_forwards = 0

    @torch.no_grad()
    def _teacher_probs(self, views: torch.Tensor) -> torch.Tensor:
        with autocast(views.device, self.precision):
            logits = self.teacher(self.normalizer(views))
        self.teacher_forwards += views.shape[0]
        return masked_probs(logits, self.temperature, self.class_mask)

    def prepare(self, x, y, idx, epoch, rng, data):
        views, _ = self._augment(x, rng)
        return views, self._teacher_probs(views)

    def prepare_rows(self, x, y, idx, epoch, rng, data, rows: slice):
        """Data-parallel training: the whole global batch's views (the same random choices on
        every rank), the teacher on this rank's rows only."""
        views, _ = self._augment(x, rng)
        return views[rows], self._teacher_probs(views[rows])

    def loss(self, logits, target):
        return kd_loss(logits, target, self.temperature, self.t_squared)


class GivenLogits(_AugmentedSource):
    """The per-image logits a method ships with its images, used as given: the target of an
    augmented view is softmax(logits / T) of its image (mixed by the batch's CutMix/Mixup weight
    with its partner's, as hard labels are). DATM trains on softmax(logits) with a soft
    cross-entropy, i.e. T = 1 without T^2: the same gradient as this KL."""

    def __init__(self, spec: AugmentSpec, image_size: int, logits: torch.Tensor, temperature: float,
                 t_squared: bool):
        super().__init__(spec, image_size)
        self.logits, self.temperature, self.t_squared = logits.float(), temperature, t_squared

    def prepare(self, x, y, idx, epoch, rng, data):
        views, params = self._augment(x, rng)
        probs = masked_probs(self.logits[idx].to(x.device), self.temperature, None)
        partner = params.partner.to(x.device)
        lam = params.lam.to(x.device).view(-1, 1)
        mixed = torch.where((partner >= 0).view(-1, 1), lam * probs + (1 - lam) * probs[partner.clamp(min=0)], probs)
        return views, mixed

    def loss(self, logits, target):
        return kd_loss(logits, target, self.temperature, self.t_squared)


@dataclass(frozen=True)
class LabelStoreConfig:
    epochs: int
    batch_size: int
    augment: AugmentSpec
    topk: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def epoch_file(root: Path, epoch: int) -> Path:
    return root / f"epoch_{epoch:04d}.pt"


def empty_epoch(n: int) -> dict:
    """One epoch of a store before it is filled, per image: crop box (top, left, h, w), flip,
    mixing partner (-1: none), own weight, pasted CutMix box. `order` and the logits come after."""
    return {"boxes": torch.zeros((n, 4), dtype=torch.int16), "flips": torch.zeros(n, dtype=torch.bool),
            "partner": torch.full((n,), -1, dtype=torch.int32), "lam": torch.ones(n, dtype=torch.float32),
            "mix_boxes": torch.zeros((n, 4), dtype=torch.int16)}


def write_epoch(root: Path, epoch: int, record: dict) -> None:
    buf = io.BytesIO()
    torch.save(record, buf)
    artifacts.atomic_write_bytes(epoch_file(root, epoch), buf.getvalue())


@torch.no_grad()
def build_label_store(root: Path, teacher: nn.Module, images: torch.Tensor, config: LabelStoreConfig,
                      normalizer, device: torch.device, image_size: int, precision: str = "fp32",
                      group: ProcessGroup = ProcessGroup()) -> dict:
    """Generate, finish or extend the stored soft labels: one atomically written file per epoch,
    so an interrupted relabel resumes at the first missing epoch. Returns the manifest of the
    store's first `config.epochs` epochs, the ones a student of that many epochs replays.
    A store grows: epoch e's file depends only on the seed, e, the batch size, the views' recipe
    and the teacher, never on how many epochs were asked for, so a store of E epochs is the first
    E epochs of a longer one (byte for byte, and so is its label hash). Students of one set that
    train for different numbers of epochs share one store (evaluate/posttrain.py keys it without
    the epochs), and each asks for what it needs; labels.json lists every epoch made so far.
    With several ranks (every rank calls this) the missing epochs are dealt round-robin; an
    epoch's file depends only on its own generator and the teacher, so the store is the one a
    single process writes, byte for byte; rank 0 writes labels.json."""
    finished = all(epoch_file(root, e).exists() for e in range(config.epochs))
    if group.broadcast(finished):  # made earlier, by this student's cell or a longer one
        manifest = _prefix_manifest(root, config, images.shape[0])
        if group.is_main and not (root / "labels.json").exists():   # killed between the last epoch and it
            _record_made(root, config, images.shape[0], manifest["files"], 0.0)
        return manifest
    teacher.eval()
    n = images.shape[0]
    spec = config.augment
    start = time.perf_counter()
    # Rank 0's list: another rank looking later would see epochs already written and deal differently.
    todo = group.broadcast([e for e in range(config.epochs) if not epoch_file(root, e).exists()])
    mine = todo[group.rank::group.world]
    if group.is_main and todo:
        check_label_store_size(root, n, _num_outputs(teacher, images, normalizer, device), config, len(todo))
    with progress.track("relabel" if group.world == 1 else f"relabel (rank {group.rank})", len(mine)) as bar:
        for epoch in mine:
            # Each epoch has its own generator: resuming at epoch e needs nothing from epochs < e.
            rng = np.random.default_rng([config.seed, 0x5EED, epoch])
            order = rng.permutation(n)
            record = empty_epoch(n)
            boxes, flips, partner, lam, mix_boxes = (record[k] for k in ("boxes", "flips", "partner", "lam",
                                                                          "mix_boxes"))
            logits_all = None
            for s in range(0, n, config.batch_size):
                idx = torch.from_numpy(order[s:s + config.batch_size])
                x = to_unit(images[idx], device)
                params = sample_aug_params(rng, len(idx), x.shape[-2], x.shape[-1], spec)
                views = augment_batch(x, params, spec, image_size)
                with autocast(device, precision):
                    logits = teacher(normalizer(views)).float().cpu()
                if logits_all is None:
                    logits_all = torch.zeros((n, logits.shape[1]), dtype=torch.float16)
                boxes[idx], flips[idx], lam[idx] = params.boxes.short(), params.flips, params.lam
                mix_boxes[idx] = params.mix_boxes.short()
                partner[idx] = torch.where(params.partner >= 0, idx[params.partner.clamp(min=0)], -1).int()
                logits_all[idx] = logits.half()
            record = {"order": torch.from_numpy(order).int(), **record}   # the key order of the files so far
            if config.topk:
                values, indices = logits_all.float().topk(config.topk, dim=1)
                record["topk_values"], record["topk_indices"] = values.half(), indices.int()
            else:
                record["logits"] = logits_all
            write_epoch(root, epoch, record)
            bar.advance(1)
    group.barrier()
    if not group.is_main:
        group.barrier()  # rank 0 writes labels.json
        return _prefix_manifest(root, config, n)
    manifest = _prefix_manifest(root, config, n)
    _record_made(root, config, n, manifest["files"], time.perf_counter() - start)
    group.barrier()
    return manifest


def _listed(root: Path) -> dict:
    """labels.json as it stands ({} before the first epoch is recorded)."""
    return artifacts.read_json(root / "labels.json") if (root / "labels.json").exists() else {}


def _manifest(root: Path, config: LabelStoreConfig, n: int, files: dict[str, str]) -> dict:
    """The manifest of the epoch files `files` (name -> hash): their label hash, bytes and the
    teacher forwards they cost."""
    return {"config": {**config.to_dict(), "epochs": len(files)}, "num_images": n, "files": files,
            "label_hash": artifacts.hash_file_map(files),
            "label_bytes": sum((root / name).stat().st_size for name in files), "teacher_forwards": n * len(files)}


def _prefix_manifest(root: Path, config: LabelStoreConfig, n: int) -> dict:
    """The manifest of the store's epochs 0..E-1 (E = config.epochs), their hashes taken from
    labels.json where it has them, so a large store is not read again."""
    known = _listed(root).get("files", {})
    paths = [epoch_file(root, e) for e in range(config.epochs)]
    return _manifest(root, config, n, {p.name: known.get(p.name) or artifacts.sha256_file(p) for p in paths})


def _record_made(root: Path, config: LabelStoreConfig, n: int, files: dict[str, str], seconds: float) -> None:
    """labels.json: every epoch made so far (this call's and any other's, also one written beside
    it by another cell of the same set), its hash, and the seconds spent making them."""
    before = _listed(root)
    every = dict(sorted({**before.get("files", {}), **files}.items()))
    artifacts.atomic_write_json(root / "labels.json", {**_manifest(root, config, n, every),
                                                       "seconds": before.get("seconds", 0.0) + seconds})


# Per image and epoch besides the logits: order (int32), crop and mix boxes (2 x 4 int16), flip
# (bool), partner (int32), lambda (float32).
_PARAM_BYTES = 4 + 16 + 1 + 4 + 4


def label_store_bytes(images: int, classes: int, epochs: int, topk: int = 0) -> int:
    """Bytes of a label store's epoch files (before torch.save's small overhead): fp16 logits of
    every class, or top-k fp16 values + int32 indices, plus the augmentation parameters."""
    per_image = (topk * (2 + 4) if topk else classes * 2) + _PARAM_BYTES
    return images * per_image * epochs


def check_label_store_size(root: Path, images: int, classes: int, config: LabelStoreConfig, epochs: int) -> None:
    """Print the store's size before anything is written; refuse clearly when the disk (or, for
    one epoch's logits, the memory) cannot hold it."""
    total = label_store_bytes(images, classes, epochs, config.topk)
    kept = f"top-{config.topk} logits" if config.topk else f"all {classes} logits"
    progress.log(f"label store: {images} images x {epochs} epochs, {kept}: {total / 2**30:.2f} GiB -> {root}")
    check_free_space(root, total, "the label store",
                     "free disk space, or point --cache-dir / $CDABENCH_CACHE at a larger disk"
                     + ("" if config.topk else ", or keep only the top-k logits ([posttrain.kd] topk = 100)"))
    one_epoch = images * classes * 4  # fp32 logits of one epoch, then its fp16 copy
    check_free_memory(one_epoch, "one relabel epoch's logits", "free memory, or relabel a smaller set")


@torch.no_grad()
def _num_outputs(teacher: nn.Module, images: torch.Tensor, normalizer, device: torch.device) -> int:
    return teacher(normalizer(to_unit(images[:1], device))).shape[1]


def load_epoch(root: Path, epoch: int) -> dict:
    return torch.load(epoch_file(root, epoch), map_location="cpu", weights_only=True)


class StoredLabels:
    """Replays a label store: the stored order, the stored crops/flips/mixing, the stored logits.
    `epochs`: how many of the store's epochs to replay (None: all it has, e.g. a method's FKD
    store); a student trained longer than that cycles through them."""

    def __init__(self, root: Path, spec: AugmentSpec, image_size: int, temperature: float, t_squared: bool,
                 num_classes: int, epochs: int | None = None):
        self.root, self.spec, self.size = Path(root), spec, image_size
        self.temperature, self.t_squared, self.num_classes = temperature, t_squared, num_classes
        self.epochs = epochs or artifacts.read_json(self.root / "labels.json")["config"]["epochs"]
        self._cache: tuple[int, dict] | None = None

    def _epoch(self, epoch: int) -> dict:
        e = epoch % self.epochs
        if self._cache is None or self._cache[0] != e:
            self._cache = (e, load_epoch(self.root, e))
        return self._cache[1]

    def epoch_order(self, epoch: int, n: int, rng) -> np.ndarray:
        order = self._epoch(epoch)["order"].numpy().astype(np.int64)
        if len(order) != n:
            raise ValueError(f"the label store holds {len(order)} images but the distilled set has {n}: "
                             "it belongs to another set; delete it to regenerate")
        return order

    def replay_views(self, x: torch.Tensor, idx: torch.Tensor, epoch: int, data) -> torch.Tensor:
        """The exact augmented batch the teacher saw when the labels were stored."""
        rec = self._epoch(epoch)
        params = AugParams(rec["boxes"][idx].long(), rec["flips"][idx], rec["partner"][idx].long(),
                           rec["lam"][idx], rec["mix_boxes"][idx].long())
        views = apply_view(pad_images(x, self.spec), params.boxes, params.flips, self.size)
        if self.spec.mix == "none":
            return views
        partner = params.partner.clamp(min=0)
        partner_x = to_unit(data.images[partner], x.device)
        partner_views = apply_view(pad_images(partner_x, self.spec), rec["boxes"][partner].long(),
                                   rec["flips"][partner], self.size)
        return apply_mix(views, partner_views, params, self.spec)

    def stored_probs(self, idx: torch.Tensor, epoch: int, device) -> torch.Tensor:
        rec = self._epoch(epoch)
        if "logits" in rec:
            return masked_probs(rec["logits"][idx].to(device), self.temperature, None)
        values = rec["topk_values"][idx].to(device).float()
        full = torch.full((len(idx), self.num_classes), float("-inf"), device=device)
        full.scatter_(1, rec["topk_indices"][idx].long().to(device), values)
        return F.softmax(full / self.temperature, dim=1)

    def prepare(self, x, y, idx, epoch, rng, data):
        return self.replay_views(x, idx, epoch, data), self.stored_probs(idx, epoch, x.device)

    def loss(self, logits, target):
        return kd_loss(logits, target, self.temperature, self.t_squared)
