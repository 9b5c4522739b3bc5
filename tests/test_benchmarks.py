"""Speed and memory, measured with pytest-benchmark (run with --benchmark-enable; in the normal
suite each benchmark body runs once, as a test of what it measures).

Compare against a saved baseline from the same machine on `min`, never `mean` (noisy here):
    pytest tests/test_benchmarks.py --benchmark-enable --benchmark-autosave
    pytest tests/test_benchmarks.py --benchmark-enable --benchmark-compare --benchmark-compare-fail=min:15%
"""
from __future__ import annotations

import resource

import numpy as np
import torch

from cdabench.distill.labels import OnlineKD
from cdabench.distill.recover import freeze, recover_batch
from cdabench.distill.train import ImageBank, Normalizer, make_optimizer, train_step
from cdabench.models import create_model
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


def test_smoke_cell(benchmark, tiny_task, tiny_teacher, tmp_path):
    """One whole cell of the smoke suite after its shared stages: post-train a ResNet-18 on an
    IPC-10 random-real set with the smoke task's protocol (40 epochs, online KD) and score it.
    The teacher is the test session's (the smoke suite's is trained once per cache and reused)."""
    from cdabench.config import load_task
    from cdabench.distill.context import open_context
    from cdabench.distill.pipeline import distill, evaluate

    task = load_task("digits-smoke")
    ctx = open_context(task, None, "cpu", tmp_path / "cache")
    # The session teacher was trained on the same digits split (same holdout fraction and seed).
    assert (task.dataset, task.holdout_fraction, task.split_seed) == (
        tiny_task.dataset, tiny_task.holdout_fraction, tiny_task.split_seed)
    distill(ctx, "random", 10, 0, tmp_path / "random", teacher=tiny_teacher)
    rounds = iter(range(100))

    def cell():
        return evaluate(ctx, tmp_path / "random", "resnet18", "soft", 0, tmp_path / f"records{next(rounds)}",
                        teacher=tiny_teacher)

    record = benchmark.pedantic(cell, rounds=3, iterations=1)
    assert record["epochs"] == task.posttrain.recipe.epochs and record["num_images"] == 100
    assert record["top1"] > 30.0  # learns: chance is 10 %
    benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb()
