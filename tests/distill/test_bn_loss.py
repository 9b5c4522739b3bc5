"""The BN statistics loss of recover (methods.md section 2) against a hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cdabench.distill.bn_loss import BNStatisticsLoss
from tests.fixtures import make_tiny_bn_net

MEAN, STD = (0.5,), (0.25,)


# ------------------------------------------------------------------ BN loss
def _hand_stats(a: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and biased variance over (N, H, W) with explicit sums."""
    n, c, h, w = a.shape
    count = n * h * w
    means, variances = [], []
    for ch in range(c):
        values = a[:, ch].double()
        mean = values.sum().item() / count
        means.append(mean)
        variances.append(((values - mean) ** 2).sum().item() / count)
    return means, variances


def _l2(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def test_bn_loss_equals_hand_computation():
    torch.manual_seed(0)
    conv1, bn1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
    conv2, bn2 = nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2)
    net = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2).eval()
    bn1.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn1.running_var.copy_(torch.tensor([0.5, 1.5, 2.0]))
    bn2.running_mean.copy_(torch.tensor([-0.4, 0.25]))
    bn2.running_var.copy_(torch.tensor([0.8, 0.3]))
    x = torch.randn(4, 1, 5, 5)

    with torch.no_grad():
        in1 = conv1(x)                          # the input of bn1
        in2 = conv2(torch.relu(bn1(in1)))       # the input of bn2 (bn1 in eval mode)
    expected = 0.0
    for weight, a, bn in ((10.0, in1, bn1), (1.0, in2, bn2)):
        means, variances = _hand_stats(a)
        expected += weight * (_l2([m - r for m, r in zip(means, bn.running_mean.tolist())])
                              + _l2([v - r for v, r in zip(variances, bn.running_var.tolist())]))

    with BNStatisticsLoss(net) as loss:
        net(x)
        value = loss.value()
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_bn_loss_reads_before_forward_and_hook_removal():
    net = make_tiny_bn_net()
    loss = BNStatisticsLoss(net)
    with pytest.raises(RuntimeError):
        loss.value()
    net(torch.rand(2, 1, 8, 8))
    first = loss.value()
    with pytest.raises(RuntimeError):  # every value() needs its own forward pass
        loss.value()
    net(torch.rand(2, 1, 8, 8))
    assert loss.value().item() != first.item()
    loss.remove()
    net(torch.rand(2, 1, 8, 8))
    with pytest.raises(RuntimeError):
        loss.value()
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BNStatisticsLoss(nn.Sequential(nn.Conv2d(1, 1, 1)))
