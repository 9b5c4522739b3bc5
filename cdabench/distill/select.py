"""The selection baselines: real images chosen per class (random, herding) or all of them (full)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cdabench.engine.models import penultimate_features


def select_random(targets: np.ndarray, ipc: int, seed: int) -> dict[int, np.ndarray]:
    """`ipc` distinct images of every class, drawn with a generator seeded by (seed, class)."""
    chosen = {}
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        chosen[int(c)] = np.random.default_rng([seed, int(c)]).choice(members, size=ipc, replace=False)
    return chosen


def herding_order(features: torch.Tensor, count: int) -> list[int]:
    """Greedy herding (Welling 2009, as in iCaRL): repeatedly take the image that brings the mean
    of the chosen features closest to the class mean. Features are L2-normalised first (iCaRL);
    ties go to the lowest index, so the result is deterministic."""
    features = torch.nn.functional.normalize(features.double(), dim=1)
    mean = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(mean)
    available = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, count + 1):
        distances = ((mean - (running + features) / k) ** 2).sum(dim=1)
        distances[~available] = float("inf")
        best = int(torch.argmin(distances))
        chosen.append(best)
        available[best] = False
        running += features[best]
    return chosen


@torch.no_grad()
def class_features(teacher: nn.Module, images: torch.Tensor, normalizer, device, batch_size: int = 256) -> torch.Tensor:
    teacher.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = normalizer(images[s:s + batch_size].to(device).float() / 255)
        out.append(penultimate_features(teacher, x).float().cpu())
    return torch.cat(out)


def select_herding(teacher: nn.Module, load_images, targets: np.ndarray, ipc: int, normalizer,
                   device) -> dict[int, np.ndarray]:
    """`load_images(indices)` gives the uint8 images of those fit indices (one class at a time,
    so a large dataset never has to fit in memory at once)."""
    chosen = {}
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        feats = class_features(teacher, load_images(members), normalizer, device)
        chosen[int(c)] = members[herding_order(feats, ipc)]
    return chosen
