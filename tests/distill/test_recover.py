"""Recover (SRe2L / CDA): the crop-scale curriculum, the shard plan, one recover batch and a resumed
run (methods.md sections 2-3). The BN statistics loss is in test_bn_loss.py, the crops in
tests/engine/test_augment.py."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from cdabench.distill.recover import cosine_lr, freeze, plan_shards, recover_batch, run_recover, shard_seed
from cdabench.schema import CropSchedule, RecoverConfig
from tests.fixtures import interrupt_at, make_tiny_bn_net

MEAN, STD = (0.5,), (0.25,)


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
