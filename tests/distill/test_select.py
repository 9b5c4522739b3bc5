"""Selection of real images: random is seeded, herding follows the greedy order on hand-made features."""
from __future__ import annotations

import math

import numpy as np
import torch

from cdabench.distill.select import herding_order, select_random


def test_random_selection_is_seeded():
    targets = np.repeat(np.arange(4), 20)
    a, b, c = select_random(targets, 5, 0), select_random(targets, 5, 0), select_random(targets, 5, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    for k, chosen in a.items():
        assert len(set(chosen.tolist())) == 5 and np.all(targets[chosen] == k)


def _unit(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_herding_order_on_hand_made_features():
    # Mean of the normalised features points at 45 degrees: the diagonal comes first; then (1,0)
    # and (0,1) are equally good and the tie goes to the lower index.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert herding_order(features, 3) == [2, 0, 1]
    assert herding_order(features * torch.tensor([[5.0], [1.0], [0.1]]), 3) == [2, 0, 1]  # L2-normalised first
    # 0, 20, 25 and 90 degrees: the mean is at ~32 degrees. After 25 and 20, herding takes 90
    # (which pulls the running mean back up) before 0, although 0 is nearer the mean than 90.
    features = _unit([0, 20, 25, 90])
    nearest = torch.argsort(((features - features.mean(0)) ** 2).sum(1)).tolist()
    assert nearest == [2, 1, 0, 3]
    assert herding_order(features, 4) == [2, 1, 3, 0]
    assert herding_order(features, 2) == [2, 1]
