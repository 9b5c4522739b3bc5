"""Class-incremental scenarios: a seeded class order, steps of equal class count, the per-step
train/test images, and the Avalanche benchmark over them (its current API,
`class_incremental_benchmark`, with our class order passed explicitly).

The class order comes from `numpy.random.default_rng(seed).permutation` (or, with the suite's
`class_order = "sre2l-cl"`, the official SRe2L continual script's legacy-numpy permutation): no library call that
touches a global random state is involved (Avalanche's own `seed=` re-seeds torch's global
generator, and it silently drops leftover classes when the step count does not divide them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cdabench.config import ConfigError
from cdabench.engine.train import ImageBank, Normalizer, evaluate_model
from cdabench.evaluate.continual import avalanche_env


CLASS_ORDERS = ("cdabench", "sre2l-cl")


def class_order(num_classes: int, seed: int, convention: str = "cdabench") -> list[int]:
    """The seeded class order, a permutation of the class indices 0..C-1 (sorted-wnid indices on
    Tiny-ImageNet). "cdabench": numpy's default_rng(seed).permutation. "sre2l-cl": the official
    SRe2L continual script's, `np.random.seed(seed); np.random.permutation(C)` (numpy's legacy
    generator, here as a private RandomState: the same numbers, no global state touched)."""
    if convention == "cdabench":
        order = np.random.default_rng(seed).permutation(num_classes)
    elif convention == "sre2l-cl":
        order = np.random.RandomState(seed).permutation(num_classes)
    else:
        raise ConfigError(f"unknown class order {convention!r}: use {' or '.join(CLASS_ORDERS)}")
    return [int(c) for c in order]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_steps(order: list[int], steps: int, what: str = "the dataset") -> list[list[int]]:
    """`steps` experiences of equal class count, in `order`; a count that does not divide the
    classes is an error (never a silently dropped or enlarged last step)."""
    n = len(order)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be a positive whole number, got {steps!r}")
    if n % steps:
        raise ConfigError(f"--steps {steps} does not divide the {n} classes of {what} into equal steps: "
                          f"use one of {', '.join(map(str, divisors(n)))}")
    size = n // steps
    return [list(order[i * size:(i + 1) * size]) for i in range(steps)]


def subset_by_classes(bank: ImageBank, classes) -> ImageBank:
    """The images of `classes`, in their original order."""
    mask = torch.isin(bank.labels, torch.as_tensor(list(classes), dtype=torch.long))
    idx = torch.nonzero(mask).flatten()
    return ImageBank(bank.images[idx], bank.labels[idx])


class NormalizedImages(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) seen as normalised float tensors, `(x, y)` per item: what an
    Avalanche dataset wraps. The pixels stay uint8 in memory (Tiny-ImageNet: 0.5 GB, not 2 GB)."""

    def __init__(self, bank: ImageBank, mean, std):
        self.images, self.labels = bank.images, bank.labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255.0)
        return (x - self.mean) / self.std, int(self.labels[i])


def avalanche_dataset(av, bank: ImageBank, mean, std):
    """A task-aware supervised classification dataset with task label 0 everywhere (class-incremental;
    LwF and DER need the task-label attribute): items are `(x, y, t)`, as in every stream."""
    n = len(bank)
    return av.TaskAwareSupervisedClassificationDataset(
        [NormalizedImages(bank, mean, std)],
        data_attributes=[av.DataAttribute(bank.labels.tolist(), "targets"),
                         av.TaskLabels(av.ConstantSequence(0, n))])


@dataclass
class Scenario:
    """One class-incremental scenario over real data: the order, the steps, the images."""

    order: list[int]
    steps: list[list[int]]
    order_seed: int
    train: ImageBank
    test: ImageBank
    mean: tuple
    std: tuple
    class_names: list[str] = field(default_factory=list)
    _test_banks: dict = field(default_factory=dict, repr=False)
    _benchmark: object = field(default=None, repr=False)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_classes(self) -> int:
        return len(self.order)

    def seen_classes(self, step: int) -> list[int]:
        """The classes of experiences 0..step, in order of appearance."""
        return [c for s in self.steps[:step + 1] for c in s]

    def test_bank(self, step: int) -> ImageBank:
        if step not in self._test_banks:
            self._test_banks[step] = subset_by_classes(self.test, self.steps[step])
        return self._test_banks[step]

    def train_bank(self, step: int) -> ImageBank:
        return subset_by_classes(self.train, self.steps[step])

    def test_counts(self) -> list[int]:
        return [len(self.test_bank(j)) for j in range(self.num_steps)]

    def composition(self) -> dict:
        """What a record stores about the scenario: enough to rebuild it exactly."""
        return {"order_seed": self.order_seed, "class_order": list(self.order),
                "steps": [list(s) for s in self.steps],
                "step_class_names": [[self.class_names[c] for c in s] for s in self.steps] if self.class_names else None,
                "train_images": [int(torch.isin(self.train.labels, torch.tensor(s)).sum()) for s in self.steps],
                "test_images": self.test_counts()}

    def benchmark(self, cache: str | Path):
        """The Avalanche class-incremental benchmark (train and test streams), built once. The
        torch global RNG state is the same after the call as before it."""
        if self._benchmark is None:
            av = avalanche_env.load(cache)
            state = torch.get_rng_state()
            try:
                with avalanche_env.quiet():
                    self._benchmark = av.class_incremental_benchmark(
                        {"train": avalanche_dataset(av, self.train, self.mean, self.std),
                         "test": avalanche_dataset(av, self.test, self.mean, self.std)},
                        class_order=list(self.order), num_experiences=self.num_steps)
            finally:
                torch.set_rng_state(state)
            for i, experience in enumerate(self._benchmark.train_stream):
                if set(experience.classes_in_this_experience) != set(self.steps[i]):  # a library change
                    raise RuntimeError(f"Avalanche put classes {sorted(experience.classes_in_this_experience)} in "
                                       f"experience {i}, but the recorded step holds {sorted(self.steps[i])}")
        return self._benchmark


def build_scenario(train: ImageBank, test: ImageBank, num_classes: int, steps: int, seed: int, mean, std,
                   class_names: list[str] | None = None, what: str = "the dataset",
                   order_convention: str = "cdabench") -> Scenario:
    """A scenario from uint8 train/test images; every class must have train and test images."""
    order = class_order(num_classes, seed, order_convention)
    split = split_steps(order, steps, what)
    for name, bank in (("train", train), ("test", test)):
        present = set(bank.labels.unique().tolist())
        missing = [c for c in range(num_classes) if c not in present]
        if missing:
            shown = ", ".join((class_names[c] if class_names else str(c)) for c in missing[:5])
            raise ConfigError(f"{what}: the {name} split has no images of class(es) {shown}: a class-incremental "
                              "scenario needs every class in both splits")
    return Scenario(order, split, seed, train, test, tuple(mean), tuple(std), list(class_names or []))


def scenario_for(ctx, steps: int, seed: int, order_convention: str = "cdabench") -> Scenario:
    """The scenario of a task: the fit split (train minus held-out) as the stream, test to score."""
    train, test = ctx.source("fit"), ctx.source("test")
    if not isinstance(train, ImageBank) or not isinstance(test, ImageBank):
        raise ConfigError(f"task {ctx.task.name}: the continual suite needs the images in memory, and "
                          f"{ctx.data.spec.name} at {ctx.image_size} px is too large for that")
    return build_scenario(train, test, ctx.num_classes, steps, seed, ctx.mean, ctx.std, ctx.classes,
                          what=f"{ctx.data.spec.name} ({ctx.task.name})", order_convention=order_convention)


def evaluate_experiences(model, scenario: Scenario, normalizer: Normalizer, device,
                         precision: str = "fp32") -> tuple[list[float], list[float]]:
    """Top-1 and top-5 (%) on the test images of every experience (seen or not): one row of the
    accuracy matrix. Predictions range over all classes (no masking at test time)."""
    top1, top5 = [], []
    for j in range(scenario.num_steps):
        result = evaluate_model(model, scenario.test_bank(j), normalizer, device, precision=precision)
        top1.append(result["top1"])
        top5.append(result["top5"])
    return top1, top5
