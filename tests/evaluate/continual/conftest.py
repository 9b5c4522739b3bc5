"""The continual protocols' fixtures: the digits task's context and small scenarios on it (5 and 2 steps)."""
from __future__ import annotations

import numpy as np
import pytest

from cdabench.config import load_task
from cdabench.engine.context import open_context
from cdabench.engine.train import ImageBank
from cdabench.evaluate.continual.scenario import build_scenario


@pytest.fixture(scope="package")
def digits(tmp_path_factory):
    return open_context(load_task("digits"), None, "cpu", tmp_path_factory.mktemp("cache"))


def digits_stream(digits, per_class: int, steps: int):
    """Digits, the first `per_class` fit images of each class (the stream), the full test split,
    `steps` experiences of equal class count in the order of seed 0."""
    fit = digits.source("fit")
    idx = np.concatenate([np.flatnonzero(fit.labels.numpy() == c)[:per_class] for c in range(10)])
    train = ImageBank(fit.images[idx], fit.labels[idx])
    return build_scenario(train, digits.source("test"), 10, steps, 0, digits.mean, digits.std, digits.classes)


@pytest.fixture(scope="package")
def small(digits):
    """20 training images per class, 5 x 2 classes."""
    return digits_stream(digits, 20, 5)


@pytest.fixture(scope="package")
def two_steps(digits):
    """12 training images per class, 2 x 5 classes: a stream naive fine-tuning forgets (test_strategies.py)."""
    return digits_stream(digits, 12, 2)
