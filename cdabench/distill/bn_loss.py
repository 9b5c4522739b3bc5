"""The BatchNorm statistics-matching loss of SRe2L/CDA (methods.md section 2).

For every BatchNorm2d of the frozen teacher, in module order, a forward hook takes the layer's
*input* and computes its per-channel mean and biased variance over (N, H, W). The loss is
    sum_l w_l * (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)
with plain (not squared) L2 norms, w_1 = `first_multiplier` (10) and w_l = 1 after.
"""
from __future__ import annotations

import torch
from torch import nn


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W), in fp32 whatever the autocast."""
    x = x.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    return mean, var


def bn_layer_loss(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    mean, var = batch_statistics(x)
    return torch.norm(mean - bn.running_mean, 2) + torch.norm(var - bn.running_var, 2)


class BNStatisticsLoss:
    """Registers the hooks once; after each teacher forward, `value()` is the weighted sum."""

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm2d layer: recover needs a BN network (e.g. resnet18)")
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            self.terms[index] = bn_layer_loss(inputs[0], module)
        return hook

    def value(self) -> torch.Tensor:
        if any(t is None for t in self.terms):
            raise RuntimeError("BN statistics loss read before a teacher forward pass")
        total = sum(w * t for w, t in zip(self.weights, self.terms))
        self.terms = [None] * len(self.layers)
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
