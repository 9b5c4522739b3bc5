"""The crop-scale curriculum: SRe2L's fixed bound and CDA's easy-to-hard schedules (methods.md sections 2-3).

Only the lower bound of RandomResizedCrop's scale moves; the upper bound stays at `max_scale`.
With milestone m (the fraction of the T iterations the curriculum spans), for t < m*T:
    step:    lower = max_scale
    linear:  lower = min + (max - min) * (1 - t / (m*T))
    cosine:  lower = min + (max - min) * (1 + cos(pi * t / (m*T))) / 2
and lower = min for t >= m*T. `fixed` is SRe2L (m irrelevant); `none` means no crop at all
(SRe2L's CIFAR-100 recipe, roll jitter only). `reverse=True` runs hard-to-easy, the variant the
CDA ablation found worse; it is here for ablations only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("none", "fixed", "step", "linear", "cosine")


@dataclass(frozen=True)
class CropSchedule:
    kind: str = "fixed"
    milestone: float = 1.0
    min_scale: float = 0.08
    max_scale: float = 1.0
    reverse: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown crop schedule {self.kind!r}: use one of {', '.join(KINDS)}")
        if not 0.0 <= self.milestone <= 1.0:
            raise ValueError(f"crop milestone must lie in [0, 1], got {self.milestone}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")

    @property
    def crops(self) -> bool:
        return self.kind != "none"

    def lower(self, t: int, total: int) -> float:
        """The scale lower bound at iteration t (0-based) of `total`."""
        if self.kind == "none":
            return self.max_scale
        if self.reverse:
            t = total - 1 - t
        span = self.milestone * total
        if self.kind == "fixed" or t >= span:
            return self.min_scale
        progress = t / span
        width = self.max_scale - self.min_scale
        if self.kind == "step":
            return self.max_scale
        if self.kind == "linear":
            return self.min_scale + width * (1.0 - progress)
        return self.min_scale + width * (1.0 + math.cos(math.pi * progress)) / 2.0

    def scale(self, t: int, total: int) -> tuple[float, float]:
        return (self.lower(t, total), self.max_scale)
