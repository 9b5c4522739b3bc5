"""Value spaces of distilled sets shipped as tensors, made explicit: `pixel` ([0, 1] units),
`normalized` ((pixel - mean) / std with the method's constants) and `zca` (kornia's
ZCAWhitening fitted on the task's [0, 1] training images, as MTT and DATM run with --zca).

Every set is brought to pixel space before training (the training loop augments pixels); a ZCA
set's student then sees whitened inputs again (`ZCANormalizer`), and so do the real test images,
as those methods evaluate. A set whose values do not fit the declared space is refused, with the
likely cause, before any training.

ZCA, as kornia.enhance.ZCAWhitening (kornia/enhance/zca.py, `zca_mean`, `linear_transform`,
`inverse_transform`) computes it with dim=0, unbiased=True: X is (N, D) (each image flattened in
C, H, W order), mu its mean over N, Sigma = (X - mu)^T (X - mu) / (N - 1), U S U^T = svd(Sigma),
T = U diag(1 / sqrt(S + eps)) U^T and T_inv = U diag(sqrt(S + eps)) U^T; whiten(x) = (x - mu) T,
and the inverse y = (x - (-mu T)) T_inv. We compute Sigma and the SVD in float64 (kornia runs in
the images' float32): the same formula, with less rounding (docs/bring-your-own.md).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from cdabench import artifacts, progress
from cdabench.data import DataError
from cdabench.engine.context import Context, eval_transform

# Whitening works on the whole flattened image: D x D matrices. 64 px RGB (12,288 values, a
# 0.6 GB float32 matrix, as DATM's Tiny-ImageNet runs) is the largest the field uses.
ZCA_MAX_FEATURES = 3 * 64 * 64
# A value space is judged by its pixel-space values: real pixels lie in [0, 1] (MTT's unclamped
# optimised sets stray a little); mean-subtracted values are about half negative.
OUTSIDE = (-0.1, 1.1)
MAX_OUTSIDE_FRACTION = 0.10


@dataclass
class ZCA:
    mean: torch.Tensor        # (1, D) float64
    transform: torch.Tensor   # (D, D) float64
    inverse: torch.Tensor     # (D, D) float64
    eps: float
    key: str                  # cache key: dataset fingerprint, size, eps

    def whiten(self, x01: torch.Tensor) -> torch.Tensor:
        """(x - mu) T, per image (N, C, H, W) -> (N, C, H, W)."""
        flat = x01.reshape(len(x01), -1).to(self.transform)
        return ((flat - self.mean) @ self.transform).reshape(x01.shape)

    def unwhiten(self, xz: torch.Tensor) -> torch.Tensor:
        """kornia's inverse_transform: (x + mu T) T_inv."""
        flat = xz.reshape(len(xz), -1).to(self.inverse)
        return ((flat + self.mean @ self.transform) @ self.inverse).reshape(xz.shape)


def fit_zca(images01: torch.Tensor, eps: float, key: str = "") -> ZCA:
    """kornia's ZCAWhitening(eps).fit on (N, C, H, W) [0, 1] images (see the module docstring)."""
    x = images01.reshape(len(images01), -1).double()
    mean = x.mean(dim=0, keepdim=True)
    centred = x - mean
    cov = centred.t() @ centred / float(len(x) - 1)
    u, s, _ = torch.linalg.svd(cov)
    s = s.reshape(-1, 1)
    transform = u @ (torch.rsqrt(s + eps) * u.t())
    inverse = u @ (torch.sqrt(s + eps) * u.t())
    return ZCA(mean, transform, inverse, eps, key)


def task_zca(ctx: Context, eps: float) -> ZCA:
    """The task's ZCA: fitted on every training image (train split, fit and held-out parts: the
    split the methods fitted theirs on) at the working size, cached by the dataset's fingerprint."""
    features = ctx.shape[0] * ctx.image_size * ctx.image_size
    if features > ZCA_MAX_FEATURES:
        raise DataError(f"ZCA whitening of {ctx.shape} images needs a {features} x {features} matrix; the largest "
                        f"the field uses is 64 px RGB ({ZCA_MAX_FEATURES}): evaluate a ZCA set at its own size")
    key = artifacts.hash_config({"zca": "kornia ZCAWhitening", "dataset": ctx.data.fingerprint(),
                                 "size": ctx.image_size, "eps": eps})
    path = ctx.cache / "zca" / f"{key}.pt"
    if path.exists():
        state = artifacts.load_state_dict(path)
        return ZCA(state["mean"], state["transform"], state["inverse"], eps, key)
    images = ctx.data.train.with_transform(eval_transform(ctx.data)).load_all().float().div_(255)
    progress.log(f"fitting ZCA (eps {eps}) on {len(images)} training images of {ctx.data.spec.name}")
    zca = fit_zca(images, eps, key)
    buf = io.BytesIO()
    torch.save({"mean": zca.mean, "transform": zca.transform, "inverse": zca.inverse}, buf)
    artifacts.atomic_write_bytes(path, buf.getvalue())
    return zca


class ZCANormalizer:
    """The student's input map for a ZCA set: [0, 1] pixels -> whitened (the test images too)."""

    def __init__(self, zca: ZCA, device: torch.device):
        self.mean = zca.mean.float().to(device)
        self.transform = zca.transform.float().to(device)

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        return ((x01.reshape(len(x01), -1) - self.mean) @ self.transform).reshape(x01.shape)


def _stats(values: torch.Tensor) -> str:
    return f"min {values.min().item():.2f}, max {values.max().item():.2f}, mean {values.mean().item():.2f}"


def outside_fraction(pixels: torch.Tensor) -> float:
    return ((pixels < OUTSIDE[0]) | (pixels > OUTSIDE[1])).float().mean().item()


def to_pixels(values: torch.Tensor, space: str, where: str, mean=(), std=(), zca: ZCA | None = None) -> torch.Tensor:
    """The set's float values in [0, 1] pixel units (float32), after checking that they fit the
    declared space; a mismatch is refused with the likely cause."""
    values = values.detach().float()
    negative = (values < 0).float().mean().item()
    if space == "pixel":
        pixels = values
        if negative == 0.0 and values.max().item() > 2.0:
            raise DataError(f"{where} is declared as pixel values ([0, 1]) but they reach {values.max().item():.0f} "
                            f"({_stats(values)}): 0..255 values? Save them as uint8, or divide them by 255")
        if outside_fraction(pixels) > MAX_OUTSIDE_FRACTION:
            raise DataError(
                f"{where} is declared as pixel values ([0, 1]) but {100 * outside_fraction(pixels):.0f}% of its values "
                f"lie outside [{OUTSIDE[0]}, {OUTSIDE[1]}] ({_stats(values)}): these look like normalized "
                f"((x - mean) / std) or ZCA-whitened values. Declare the space the method saved them in "
                "(--space normalized, with the method's mean/std in a method entry, or --space zca)")
        return pixels
    if negative == 0.0:
        raise DataError(
            f"{where} is declared as {space} values but none of them is negative ({_stats(values)}): "
            "mean-subtracted values are about half negative, so these look like pixel values in [0, 1] "
            "(MTT's images_zca_*.pt files hold the inverse-whitened, pixel-space images despite their name). "
            "Declare --space pixel")
    if space == "normalized":
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if m.shape[1] != values.shape[1]:
            raise DataError(f"{where}: the normalisation has {m.shape[1]} channel(s) but the images have "
                            f"{values.shape[1]}: give one mean and std per channel")
        pixels = values * s + m
        cause = "the method normalised with other constants (name its mean/std in the method entry)"
    elif space == "zca":
        pixels = zca.unwhiten(values).float()
        cause = ("these are not ZCA-whitened images of this task's data (whitened with another eps, or normalized "
                 "values: declare --space normalized)")
    else:
        raise DataError(f"unknown value space {space!r}: use pixel, normalized or zca")
    if outside_fraction(pixels) > MAX_OUTSIDE_FRACTION:
        raise DataError(
            f"{where}, declared as {space} values, gives pixels of which {100 * outside_fraction(pixels):.0f}% lie "
            f"outside [{OUTSIDE[0]}, {OUTSIDE[1]}] ({_stats(pixels)}): {cause}")
    return pixels
