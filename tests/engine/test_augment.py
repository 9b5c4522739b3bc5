"""The crops of recover and training: boxes inside the image and seeded, torchvision's centre-crop
fallback, and the differentiable crop-and-resize against crop-then-interpolate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdabench.engine.augment import crop_resize, sample_crop_box


# ---------------------------------------------------------------- crops
@pytest.mark.parametrize("size", [8, 32, 64, 224])
def test_crop_box_scale_one_is_whole_image(size):
    for seed in range(20):
        assert sample_crop_box(np.random.default_rng(seed), size, size, (1.0, 1.0)) == (0, 0, size, size)


def test_crop_box_fallback_is_torchvision_centre_crop():
    # 24 x 40 is wider than 4:3, so no try fits and torchvision's fallback keeps the height.
    assert sample_crop_box(np.random.default_rng(0), 24, 40, (1.0, 1.0)) == (0, 4, 24, 32)


def test_crop_boxes_lie_inside_and_are_seeded():
    for seed in range(200):
        for height, width, scale in ((8, 8, (0.08, 1.0)), (32, 24, (0.3, 0.6)), (5, 9, (0.08, 1.0))):
            top, left, h, w = sample_crop_box(np.random.default_rng(seed), height, width, scale)
            assert h >= 1 and w >= 1 and top >= 0 and left >= 0
            assert top + h <= height and left + w <= width
    a = [sample_crop_box(np.random.default_rng(7), 64, 64, (0.08, 1.0)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    others = {sample_crop_box(np.random.default_rng(s), 64, 64, (0.08, 1.0)) for s in range(10)}
    assert len(others) > 1


def test_crop_resize_full_box_is_identity():
    x = torch.rand(3, 2, 8, 8)
    out = crop_resize(x, torch.tensor([[0, 0, 8, 8]] * 3), 8)
    assert torch.allclose(out, x, atol=1e-6)


def _reference_crop(x, box, size):
    top, left, h, w = box
    return F.interpolate(x[..., top:top + h, left:left + w], size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("box,size", [
    ((0, 0, 8, 8), (8, 8)),            # whole image
    ((1, 2, 6, 5), (4, 4)),            # downsampling
    ((2, 1, 6, 6), (3, 3)),
    ((0, 0, 8, 8), (5, 7)),
    ((2, 1, 4, 5), (8, 8)),            # the recover case: a crop resized to full size (no pixel
    ((0, 0, 4, 4), (8, 8)),            # outside the box may leak in at its interior edges)
    ((4, 4, 4, 4), (8, 8)),
])
def test_crop_resize_equals_crop_then_interpolate(box, size):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    out = crop_resize(x, torch.tensor([box, box]), size)
    assert torch.allclose(out, _reference_crop(x, box, size), atol=1e-5)


def test_crop_resize_per_sample_boxes():
    torch.manual_seed(1)
    x = torch.rand(2, 1, 8, 8)
    boxes = [(0, 0, 8, 8), (1, 1, 6, 6)]
    out = crop_resize(x, torch.tensor(boxes), 4)
    for k, box in enumerate(boxes):
        assert torch.allclose(out[k:k + 1], _reference_crop(x[k:k + 1], box, (4, 4)), atol=1e-5)
