"""Recover (SRe2L / CDA): the BN statistics loss, the crop-scale curriculum, the crops, the shard
plan, one recover batch and a resumed run (methods.md sections 2-3)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdabench.distill.bn_loss import BNStatisticsLoss
from cdabench.distill.recover import cosine_lr, freeze, plan_shards, recover_batch, run_recover, shard_seed
from cdabench.engine.augment import crop_resize, sample_crop_box
from cdabench.schema import CropSchedule, RecoverConfig

from tests.conftest import make_tiny_bn_net
from tests.interrupt import interrupt_at

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


# ---------------------------------------------------------- crop schedule
def _formula(kind: str, t: int, total: int, m: float) -> float:
    if t >= m * total:
        return 0.08
    if kind == "step":
        return 1.0
    if kind == "linear":
        return 0.08 + 0.92 * (1 - t / (m * total))
    return 0.08 + 0.92 * (1 + math.cos(math.pi * t / (m * total))) / 2


@pytest.mark.parametrize("kind", ["step", "linear", "cosine"])
@pytest.mark.parametrize("milestone", [0.5, 1.0])
def test_crop_schedule_matches_methods_formulas(kind, milestone):
    total = 200
    schedule = CropSchedule(kind=kind, milestone=milestone)
    for t in (0, 1, 20, 50, 99, 100, 101, 150, 199):
        assert schedule.lower(t, total) == pytest.approx(_formula(kind, t, total, milestone), abs=1e-12), t
        assert schedule.scale(t, total) == (pytest.approx(_formula(kind, t, total, milestone)), 1.0)
    # Easy to hard: the whole image at the start, the SRe2L bound from m*T on.
    assert schedule.lower(0, total) == 1.0
    if milestone < 1:
        assert schedule.lower(int(milestone * total), total) == 0.08
        assert schedule.lower(total - 1, total) == 0.08


def test_crop_schedule_known_points():
    total = 100
    assert CropSchedule("cosine", 1.0).lower(50, total) == pytest.approx(0.54)   # cos(pi/2) = 0
    assert CropSchedule("linear", 1.0).lower(25, total) == pytest.approx(0.77)
    assert CropSchedule("cosine", 0.5).lower(25, total) == pytest.approx(0.54)
    assert CropSchedule("step", 0.5).lower(49, total) == 1.0
    assert CropSchedule("step", 0.5).lower(50, total) == 0.08


@pytest.mark.parametrize("kind", ["fixed", "step", "linear", "cosine"])
def test_fixed_and_zero_milestone_are_sre2l(kind):
    total = 50
    for t in range(total):
        assert CropSchedule("fixed", milestone=0.7).lower(t, total) == 0.08
        assert CropSchedule(kind, milestone=0.0).lower(t, total) == 0.08
    assert CropSchedule("fixed").scale(3, total) == (0.08, 1.0)
    assert CropSchedule("fixed").crops and not CropSchedule("none").crops


@pytest.mark.parametrize("kwargs", [{"kind": "exponential"}, {"kind": "cosine", "milestone": 1.5},
                                    {"kind": "linear", "milestone": -0.1}])
def test_crop_schedule_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        CropSchedule(**kwargs)


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


# ------------------------------------------------------------- shard plan
def test_plan_small_dataset_one_interleaved_shard():
    shards = plan_shards(10, 10, 100)
    assert len(shards) == 1
    shard = shards[0]
    assert shard.classes == tuple(range(10)) and shard.ipc_indices == tuple(range(10))
    assert shard.labels == list(range(10)) * 10          # class fastest
    assert shard.slots[:11] == [(c, 0) for c in range(10)] + [(0, 1)]


def test_plan_large_dataset_chunks_of_classes():
    ipc = 3
    shards = plan_shards(250, ipc, 100)
    assert len(shards) == 3 * ipc
    sizes = [len(s.classes) for s in shards]
    assert sizes == [100] * ipc + [100] * ipc + [50] * ipc
    for s in shards:
        assert len(s.ipc_indices) == 1 and len(s.labels) == len(s.classes)  # one image per class
    slots = [slot for s in shards for slot in s.slots]
    assert sorted(slots) == [(c, k) for c in range(250) for k in range(ipc)]  # every slot exactly once
    assert len({s.name for s in shards}) == len(shards)
    assert len({shard_seed(0, s) for s in shards}) == len(shards)


def test_plan_uneven_ipc_groups():
    shards = plan_shards(3, 5, 6)  # 2 IPC indices per batch: groups (0,1), (2,3), (4,)
    assert [s.ipc_indices for s in shards] == [(0, 1), (2, 3), (4,)]
    assert shards[-1].labels == [0, 1, 2]


# ------------------------------------------------------------ one batch
def _config(**changes) -> RecoverConfig:
    base = dict(iterations=5, lr=0.25, r_bn=0.01, batch_size=3, jitter=1, crop=CropSchedule("cosine", 1.0))
    base.update(changes)
    return RecoverConfig(**base)


def test_cosine_lr():
    for t, total in ((0, 10), (3, 10), (5, 10), (9, 10), (10, 10), (1234, 4000)):
        assert cosine_lr(0.25, t, total) == pytest.approx(0.5 * 0.25 * (1 + math.cos(math.pi * t / total)))
    assert cosine_lr(0.25, 0, 10) == 0.25 and cosine_lr(0.25, 10, 10) == pytest.approx(0.0)


def test_recover_batch_learns_only_images():
    teacher = freeze(make_tiny_bn_net(num_classes=3))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    steps = []
    images, stats = recover_batch(teacher, [0, 1, 2, 0], _config(), seed=3, shape=(1, 8, 8), mean=MEAN, std=STD,
                                  device=torch.device("cpu"), on_step=lambda t, ce, bn: steps.append(t))
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 8, 8)
    assert steps == list(range(5))
    assert set(stats) == {"final_ce", "final_bn"} and all(math.isfinite(v) for v in stats.values())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics untouched


def test_recover_batch_is_seeded():
    teacher = freeze(make_tiny_bn_net(num_classes=3))
    run = lambda seed, config=_config(): recover_batch(  # noqa: E731
        teacher, [0, 1, 2], config, seed, (1, 8, 8), MEAN, STD, torch.device("cpu"))[0]
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Other schedules are seeded too (no global RNG anywhere).
    for crop in (CropSchedule("fixed"), CropSchedule("none")):
        config = _config(crop=crop, jitter_symmetric=True)
        assert torch.equal(run(5, config), run(5, config))


def test_recover_batch_optimises_from_noise():
    """More iterations move the images further from the initial noise, within the [0, 1] image."""
    teacher = freeze(make_tiny_bn_net(num_classes=3))
    zero = recover_batch(teacher, [0, 1, 2], _config(iterations=1, lr=1e-12), 4, (1, 8, 8), MEAN, STD,
                         torch.device("cpu"))[0]
    moved = recover_batch(teacher, [0, 1, 2], _config(iterations=5), 4, (1, 8, 8), MEAN, STD,
                          torch.device("cpu"))[0]
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn((3, 1, 8, 8), generator=generator)
    expected = (noise * STD[0] + MEAN[0]).clamp(0, 1).mul(255).to(torch.uint8)
    assert (zero.int() - expected.int()).abs().max() <= 1    # an lr of ~0 keeps the N(0, 1) start
    assert not torch.equal(moved, zero)


# ------------------------------------------------------------ resumed run
def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "images").rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_run_recover_resumes_byte_identically(tmp_path):
    teacher = make_tiny_bn_net(num_classes=3)
    folders = ["a", "b", "c"]
    config = _config(batch_size=3)
    args = dict(class_folders=folders, ipc=3, config=config, seed=9, shape=(1, 8, 8), mean=MEAN, std=STD,
                device=torch.device("cpu"))
    assert len(plan_shards(3, 3, 3)) == 3

    resumed = tmp_path / "resumed"
    # Killed in the second shard's first step: the first shard is kept, the second left no file.
    with pytest.raises(KeyboardInterrupt), interrupt_at("recover", config.iterations + 1):
        run_recover(teacher, resumed, **args)
    markers = sorted(p.name for p in (resumed / "shards").glob("*.json"))
    assert markers == ["c0000_g0000.json"]
    assert len(_files(resumed)) == 3
    first_marker = resumed / "shards" / "c0000_g0000.json"
    stamp = first_marker.stat().st_mtime_ns
    result = run_recover(teacher, resumed, **args)
    assert first_marker.stat().st_mtime_ns == stamp     # the finished shard was not redone
    assert sorted(result) == ["c0000_g0000", "c0000_g0001", "c0000_g0002"]

    straight = tmp_path / "straight"
    run_recover(teacher, straight, **args)
    files_resumed, files_straight = _files(resumed), _files(straight)
    assert sorted(files_resumed) == [f"images/{c}/ipc{k:04d}.png" for c in folders for k in range(3)]
    assert files_resumed == files_straight
    # The markers' hashes are those of the files on disk.
    for marker in result.values():
        for rel, digest in marker["files"].items():
            assert hashlib.sha256((resumed / "images" / rel).read_bytes()).hexdigest() == digest
