"""Speed and memory, measured with pytest-benchmark (run with --benchmark-enable; in the normal
suite each benchmark body runs once, as a test of what it measures).

Compare against a saved baseline from the same machine on `min`, never `mean` (noisy here):
    pytest tests/test_benchmarks.py -n 0 --benchmark-enable --benchmark-autosave
    pytest tests/test_benchmarks.py -n 0 --benchmark-enable --benchmark-compare --benchmark-compare-fail=min:15%
"""
from __future__ import annotations

import random
import resource

import numpy as np
import pytest
import torch
from torch import nn

from cdabench.distill.recover import RecoverForward, freeze, recover_batch, recover_shards
from cdabench.engine.labels import HardLabels, OnlineKD
from cdabench.engine.models import create_model
from cdabench.engine.runtime import bf16_supported, prepare_model
from cdabench.engine.train import ImageBank, Normalizer, make_optimizer, train_step
from cdabench.schema import AugmentSpec, CropSchedule, RecoverConfig, TrainRecipe

SHAPE = (1, 8, 8)  # the embedded default's working shape
MEAN, STD = (0.3054,), (0.3760,)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_recover_iteration(benchmark):
    """One recover iteration at batch 100 (the digits default: ResNet-18, 8 px)."""
    torch.manual_seed(0)
    teacher = freeze(create_model("resnet18", 10, SHAPE[0], SHAPE[1]))
    config = RecoverConfig(iterations=1, batch_size=100, jitter=1, crop=CropSchedule("cosine", 1.0))
    labels = [c for _ in range(10) for c in range(10)]
    images, _ = benchmark(recover_batch, teacher, labels, config, 0, SHAPE, MEAN, STD, torch.device("cpu"))
    assert images.shape == (100, *SHAPE) and images.dtype == torch.uint8
    # Recover optimises the images only: no weight gradient is ever computed.
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb()


# ------------------------------------------------ recover throughput at the Tiny-ImageNet shape
# ResNet-18 with the small stem, 64 px, batch 100, 200 classes (Tiny-ImageNet's CDA recover), a
# random-init teacher (speed does not depend on the weights). A few iterations only: this CPU
# takes seconds per iteration. With benchmarks disabled (the normal suite) the same code runs once
# at 16 px, batch 10, as a test of what it measures.
TINY_CLASSES, TINY_ITERATIONS = 200, 2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tiny_shape(benchmark) -> tuple[int, int]:
    """(image size, batch): the Tiny-ImageNet shape when measuring, a small one otherwise."""
    return (16, 10) if benchmark.disabled else (64, 100)


def _tiny_teacher(size: int) -> nn.Module:
    torch.manual_seed(0)
    return freeze(create_model("resnet18", TINY_CLASSES, 3, size))


def _record_throughput(benchmark, images: int) -> None:
    if benchmark.stats is not None:   # image-iterations per second from the fastest round
        benchmark.extra_info["image_iterations_per_s"] = images * TINY_ITERATIONS / benchmark.stats.stats.min
    benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_recover_throughput(benchmark, shards, precision):
    """cdabench's recover engine: K shards of B images per teacher forward (CDA's schedule)."""
    if precision == "bf16" and not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    size, batch = _tiny_shape(benchmark)
    teacher = _tiny_teacher(size)
    config = RecoverConfig(iterations=TINY_ITERATIONS, batch_size=batch, jitter=4, crop=CropSchedule("cosine", 1.0),
                           precision=precision, shards_per_forward=shards)
    labels = [[(k * batch + i) % TINY_CLASSES for i in range(batch)] for k in range(shards)]
    results = benchmark.pedantic(recover_shards, args=(teacher, labels, config, list(range(shards)), (3, size, size),
                                                      IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu")),
                                 rounds=1, iterations=1)
    assert len(results) == shards and all(images.shape == (batch, 3, size, size) for images, _ in results)
    # Recover optimises the images only: no weight gradient is ever computed.
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    _record_throughput(benchmark, shards * batch)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recover_throughput_compiled(benchmark, precision, inductor):
    """The engine with `compile = true`, K = 1, compiled once before the timed round (a long run
    pays that minute once). Only measured: compiling ResNet-18 takes about a minute here, and
    the compiled engine's results are tested in tests/distill/test_recover_engine.py."""
    if benchmark.disabled:
        pytest.skip("measured with --benchmark-enable only (compiling takes a minute)")
    if precision == "bf16" and not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    size, batch = _tiny_shape(benchmark)
    teacher = _tiny_teacher(size)
    config = RecoverConfig(iterations=TINY_ITERATIONS, batch_size=batch, jitter=4, crop=CropSchedule("cosine", 1.0),
                           precision=precision, shards_per_forward=1, compile=True)
    labels = [[i % TINY_CLASSES for i in range(batch)]]
    args = (teacher, labels, config, [0], (3, size, size), IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
    with RecoverForward(teacher, config, torch.device("cpu")) as forward:
        recover_shards(*args, forward=forward)                                    # compiles
        assert forward.compiled, "torch.compile fell back to eager on this machine"
        results = benchmark.pedantic(recover_shards, args=args, kwargs={"forward": forward}, rounds=1, iterations=1)
    assert results[0][0].shape == (batch, 3, size, size)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    _record_throughput(benchmark, batch)


class _OfficialBNHook:
    """The official code's BNFeatureHook: one object per BN layer, variance through a permute."""

    def __init__(self, module: nn.BatchNorm2d):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)

    def close(self):
        self.hook.remove()


def official_reference_loop(teacher: nn.Module, targets: torch.Tensor, size: int, iterations: int,
                            seed: int = 0) -> torch.Tensor:
    """The official CDA recover iteration's structure, transcribed (official-side-by-side.md): a new
    Compose(RandomResizedCrop, RandomHorizontalFlip) on the batch tensor each iteration (one box
    and one flip per batch), Python `random` roll offsets, per-layer hook objects, the cosine lr set
    every iteration, and the per-channel clamp of `inputs.data`. fp32, as the official code."""
    from torchvision import transforms

    torch.manual_seed(seed)              # torchvision's transforms draw from the global generator
    offsets = random.Random(seed)        # the official code uses the global `random`; seeded here
    schedule, jitter, lr, r_bn, first_bn_multiplier = CropSchedule("cosine", 1.0), 4, 0.25, 0.01, 10.0
    hooks = [_OfficialBNHook(m) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs = torch.randn((len(targets), 3, size, size), requires_grad=True)
    optimizer = torch.optim.Adam([inputs], lr=lr, betas=[0.5, 0.9], eps=1e-8)
    criterion = nn.CrossEntropyLoss()
    for iteration in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * (1 + np.cos(np.pi * iteration / iterations)) * lr
        aug = transforms.Compose([transforms.RandomResizedCrop(size, scale=(schedule.lower(iteration, iterations), 1)),
                                  transforms.RandomHorizontalFlip()])
        inputs_jit = aug(inputs)
        off1, off2 = offsets.randint(0, jitter), offsets.randint(0, jitter)
        inputs_jit = torch.roll(inputs_jit, shifts=(off1, off2), dims=(2, 3))
        optimizer.zero_grad()
        outputs = teacher(inputs_jit)
        loss_ce = criterion(outputs, targets)
        rescale = [first_bn_multiplier] + [1.0 for _ in range(len(hooks) - 1)]
        loss_r_bn_feature = sum([mod.r_feature * rescale[idx] for (idx, mod) in enumerate(hooks)])
        loss = loss_ce + r_bn * loss_r_bn_feature
        loss.backward()
        optimizer.step()
        for c in range(3):
            m, s = IMAGENET_MEAN[c], IMAGENET_STD[c]
            inputs.data[:, c] = torch.clamp(inputs.data[:, c], -m / s, (1 - m) / s)
    for hook in hooks:
        hook.close()
    return inputs.detach()


def test_recover_throughput_official_reference(benchmark):
    """The reference for test_recover_throughput: the official loop's structure, same teacher and shape."""
    size, batch = _tiny_shape(benchmark)
    teacher = _tiny_teacher(size)
    targets = torch.arange(batch) % TINY_CLASSES
    images = benchmark.pedantic(official_reference_loop, args=(teacher, targets, size, TINY_ITERATIONS),
                                rounds=1, iterations=1)
    assert images.shape == (batch, 3, size, size) and torch.isfinite(images).all()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    _record_throughput(benchmark, batch)


def test_posttrain_step(benchmark):
    """One post-train step of a ResNet-18 student with online KD at batch 100, 8 px."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    teacher = freeze(create_model("resnet18", 10, SHAPE[0], SHAPE[1]))
    student = create_model("resnet18", 10, SHAPE[0], SHAPE[1])
    recipe = TrainRecipe(optimizer="adamw", lr=1e-3, weight_decay=0.01)
    optimizer = make_optimizer(student, recipe)
    normalizer = Normalizer(MEAN, STD, device)
    labels = OnlineKD(AugmentSpec(crop="rrc", min_scale=0.25), SHAPE[1], teacher, normalizer, 4.0, True)
    bank = ImageBank(torch.randint(0, 256, (100, *SHAPE), dtype=torch.uint8), torch.arange(100) % 10)
    rng = np.random.default_rng(0)
    x, y, idx = next(bank.batches(np.arange(100), 100))
    before = [p.detach().clone() for p in student.parameters()]
    loss = benchmark(train_step, student, optimizer, labels, normalizer, device, x, y, idx, 0, rng, bank)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_posttrain_step_mobilenet_layout(benchmark, layout):
    """One post-train step of MobileNetV2-0.35 (hard labels, batch 25, 8 px) in each memory layout:
    prepare_model puts a model with depthwise convolutions in channels-last on a CPU (1.5x here,
    docs/digits-narrow-panel.md; tests/engine/test_runtime.py checks that both layouts do the same
    arithmetic)."""
    device = torch.device("cpu")
    bank = ImageBank(torch.randint(0, 256, (25, *SHAPE), dtype=torch.uint8), torch.arange(25) % 10)
    x, y, idx = next(bank.batches(np.arange(25), 25))
    labels, normalizer = HardLabels(AugmentSpec(crop="none", flip=False), SHAPE[1]), Normalizer(MEAN, STD, device)
    torch.manual_seed(0)
    student = create_model("mobilenetv2_035", 10, SHAPE[0], SHAPE[1])
    student = prepare_model(student, device) if layout == "channels_last" else student
    optimizer = make_optimizer(student, TrainRecipe(optimizer="adamw", lr=0.01, weight_decay=0.01))
    benchmark(train_step, student, optimizer, labels, normalizer, device, x, y, idx, 0, np.random.default_rng(0), bank)
    benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb()


def test_smoke_cell(benchmark, tiny_task, tiny_teacher, tmp_path):
    """One whole cell of the smoke suite after its shared stages: post-train the smoke suite's
    student on an IPC-10 random-real set with the smoke task's protocol (online KD) and score it.
    The teacher is the test session's (the smoke suite's is trained once per cache and reused)."""
    from cdabench.config import load_task
    from cdabench.distill.sets import distill
    from cdabench.engine.context import open_context
    from cdabench.evaluate.posttrain import evaluate
    from cdabench.harness.suites import load_suite

    task = load_task("digits-smoke")
    student = load_suite("smoke").students[0]
    ctx = open_context(task, None, "cpu", tmp_path / "cache")
    # The session teacher was trained on the same digits split (same holdout fraction and seed).
    assert (task.dataset, task.holdout_fraction, task.split_seed) == (
        tiny_task.dataset, tiny_task.holdout_fraction, tiny_task.split_seed)
    distill(ctx, "random", 10, 0, tmp_path / "random", teacher=tiny_teacher)

    def cell():
        return evaluate(ctx, tmp_path / "random", student, "soft", 0, teacher=tiny_teacher)

    record = benchmark.pedantic(cell, rounds=3, iterations=1)
    assert record["epochs"] == task.posttrain.recipe.epochs and record["num_images"] == 100
    assert record["top1"] > 30.0  # learns: chance is 10 %
    benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb()


# ------------------------------------------------------------- the data path at ImageNet's view
_DATA_IMAGES = 64


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """A generated ImageFolder of 256 px JPEGs (seeded noise over a class colour; 2 classes)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for k in range(_DATA_IMAGES):
        path = root / f"class{k % 2}" / f"{k:04d}.JPEG"
        path.parent.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) // 2 + (64 if k % 2 else 0)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return root


def _imagenet_view_split(root):
    from torchvision.transforms import v2

    from cdabench.data.images import load_imagefolder
    split, _ = load_imagefolder(root, 3)
    return split.with_transform(v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)]))


def test_images_decoded_from_original_files(benchmark, jpeg_folder):
    """Decode + resize + centre crop of 256 px JPEGs to the 224 px working view, one process:
    what every stage paid per image before the prepared cache (extra_info: images per second)."""
    split = _imagenet_view_split(jpeg_folder)
    images = benchmark(split.load_all)
    assert images.shape == (_DATA_IMAGES, 3, 224, 224)
    benchmark.extra_info["images_per_s"] = _DATA_IMAGES / benchmark.stats.stats.mean if benchmark.stats else None


def test_images_served_from_the_prepared_cache(benchmark, jpeg_folder, tmp_path):
    """The same 224 px views served from the memory-mapped prepared cache in batches of 32 (the
    ImageBank path every stage uses; decoded once beforehand)."""
    from cdabench.data.prepared import prepared_split
    split = _imagenet_view_split(jpeg_folder)
    images, targets = prepared_split(split, tmp_path / "prepared", "imagenet-view", (3, 224, 224))
    bank = ImageBank(images, targets)

    def serve():
        return [x.clone() for x, _, _ in bank.batches(np.arange(len(bank)), 32)]

    batches = benchmark(serve)
    assert torch.equal(torch.cat(batches), split.load_all())
    benchmark.extra_info["images_per_s"] = _DATA_IMAGES / benchmark.stats.stats.mean if benchmark.stats else None
