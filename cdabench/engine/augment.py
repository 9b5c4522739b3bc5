"""Batched image augmentation whose parameters are sampled apart from their application.

Sampling (`sample_*`, numpy Generator, CPU) is separate from applying (`apply_*`, torch, any
device), so the same parameters can be stored and replayed exactly (FKD-style soft labels) and
every random choice comes from a seeded generator, never from global RNG state.
Crops are resized by two gathers over per-image boxes: numerically the same as cropping then
`interpolate(bilinear, align_corners=False)`, batched and differentiable in the image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cdabench.schema import AugmentSpec

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def to_unit(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pixels in [0, 1] units on `device`, what augmentation works on: uint8 / 255, or float
    pixel-space images as they are (a distilled set shipped as float tensors keeps its exact
    values, those beyond [0, 1] included)."""
    if x.dtype == torch.uint8:
        return x.to(device, non_blocking=True).float().div_(255.0)
    return x.to(device, non_blocking=True).float()


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: tuple[float, float], ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), the same algorithm as torchvision's get_params:
    ten tries at a random area and log-uniform aspect ratio, then a centre crop fallback (with
    scale (1, 1) that fallback is the whole image)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop box k = (top, left, h, w) of image k and resize it bilinearly to `size`: the same
    numbers as `interpolate(x[..., top:top+h, left:left+w], size, mode="bilinear",
    align_corners=False)` (torchvision's tensor resize without antialias, which equals the
    antialiased one when upsampling, as every crop is), batched over per-image boxes and
    differentiable in x. Written as two gathers with integer source indices inside the box: a
    pixel outside the box gets exactly zero gradient, as in the official loop (a grid_sample
    version leaked ~1e-7 gradients there, which Adam's normalised step turns into real updates)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    n, channels, height, width = x.shape
    boxes = boxes.to(device=x.device, dtype=torch.long)
    top, left, h, w = (t[:, None] for t in boxes.unbind(1))

    def source(start, extent, out):
        # interpolate's source coordinate: scale * (dst + 0.5) - 0.5, clamped at 0 (align_corners=False).
        scale = extent.to(torch.float32) / out
        steps = torch.arange(out, device=x.device, dtype=torch.float32)[None, :]
        coord = (scale * (steps + 0.5) - 0.5).clamp(min=0)
        low = coord.floor().long().minimum(extent - 1)
        high = (low + 1).minimum(extent - 1)
        return start + low, start + high, (coord - low).to(x.dtype)

    y0, y1, wy = source(top, h, out_h)
    x0, x1, wx = source(left, w, out_w)
    rows = lambda idx: idx[:, None, :, None].expand(n, channels, out_h, width)    # noqa: E731
    cols = lambda idx: idx[:, None, None, :].expand(n, channels, out_h, out_w)    # noqa: E731
    wy, wx = wy[:, None, :, None], wx[:, None, None, :]
    resized_rows = x.gather(2, rows(y0)) * (1 - wy) + x.gather(2, rows(y1)) * wy
    return resized_rows.gather(3, cols(x0)) * (1 - wx) + resized_rows.gather(3, cols(x1)) * wx


def apply_flips(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    flips = flips.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flips, x.flip(-1), x)


def sample_cutmix_box(rng: np.random.Generator, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """CutMix's pasted box (top, left, h, w) for mixing weight lam (the standard recipe: side
    sqrt(1 - lam), centre uniform, clipped to the image)."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y1, x1, y2 - y1, x2 - x1


@dataclass
class AugParams:
    """Per-sample parameters of one batch. Mixing is stored per sample (partner position in the
    batch, weight and pasted box), so a stored epoch can be replayed with any batch size.
    boxes: (N, 4) int (top, left, h, w) in the (padded) image; flips: (N,) bool;
    partner: (N,) int, -1 = not mixed; lam: (N,) float, weight of the sample itself;
    mix_boxes: (N, 4) int, the CutMix box pasted from the partner (zeros for mixup)."""

    boxes: torch.Tensor
    flips: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor
    mix_boxes: torch.Tensor


def sample_aug_params(rng: np.random.Generator, n: int, height: int, width: int, spec: AugmentSpec) -> AugParams:
    boxes = np.zeros((n, 4), dtype=np.int64)
    for k in range(n):
        if spec.crop == "rrc":
            boxes[k] = sample_crop_box(rng, height, width, (spec.min_scale, 1.0))
        elif spec.crop == "pad":
            boxes[k] = (rng.integers(0, 2 * spec.pad + 1), rng.integers(0, 2 * spec.pad + 1), height, width)
        else:
            boxes[k] = (0, 0, height, width)
    flips = rng.random(n) < 0.5 if spec.flip else np.zeros(n, dtype=bool)
    partner = np.full(n, -1, dtype=np.int64)
    lam = np.ones(n, dtype=np.float32)
    mix_boxes = np.zeros((n, 4), dtype=np.int64)
    if spec.mix != "none" and n > 1:
        # One weight and one box per batch, partners by a batch permutation: the usual recipe.
        partner = rng.permutation(n).astype(np.int64)
        weight = float(rng.beta(spec.mix_alpha, spec.mix_alpha))
        if spec.mix == "cutmix":
            box = sample_cutmix_box(rng, height, width, weight)
            mix_boxes[:] = box
            weight = 1.0 - (box[2] * box[3]) / (height * width)
        lam[:] = weight
    return AugParams(torch.from_numpy(boxes), torch.from_numpy(flips), torch.from_numpy(partner),
                     torch.from_numpy(lam), torch.from_numpy(mix_boxes))


def pad_images(x: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """Zero (black) padding for the "pad" crop; augmentation runs on [0, 1] pixels, before normalising."""
    if spec.crop != "pad" or spec.pad == 0:
        return x
    return torch.nn.functional.pad(x, (spec.pad,) * 4)


def apply_view(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop + resize + flip: one augmented view of each image."""
    return apply_flips(crop_resize(x, boxes, size), flips)


def apply_mix(views: torch.Tensor, partner_views: torch.Tensor, params: AugParams, spec: AugmentSpec) -> torch.Tensor:
    """Mix each view with its partner's view (CutMix pastes the partner's box, Mixup blends)."""
    if spec.mix == "none":
        return views
    mixed = (params.partner >= 0).to(views.device)
    if spec.mix == "mixup":
        lam = params.lam.to(views).view(-1, 1, 1, 1)
        blended = lam * views + (1 - lam) * partner_views
        return torch.where(mixed.view(-1, 1, 1, 1), blended, views)
    h, w = views.shape[-2:]
    rows = torch.arange(h, device=views.device).view(1, h, 1)
    cols = torch.arange(w, device=views.device).view(1, 1, w)
    top, left, bh, bw = (t.to(views.device).view(-1, 1, 1) for t in params.mix_boxes.unbind(1))
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw) & mixed.view(-1, 1, 1)
    return torch.where(inside.unsqueeze(1), partner_views, views)


def augment_batch(x: torch.Tensor, params: AugParams, spec: AugmentSpec, size: int) -> torch.Tensor:
    """The whole batch augmentation for in-batch mixing (partners index the batch)."""
    views = apply_view(pad_images(x, spec), params.boxes, params.flips, size)
    if spec.mix == "none":
        return views
    partner_views = views[params.partner.clamp(min=0).to(views.device)]
    return apply_mix(views, partner_views, params, spec)
