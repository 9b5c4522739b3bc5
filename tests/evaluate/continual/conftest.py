"""The continual protocols' fixtures: the digits task's context and a small 5-step scenario on it."""
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


@pytest.fixture(scope="package")
def small(digits):
    """Digits, 20 training images per class (the stream), the full test split, 5 x 2 classes."""
    fit = digits.source("fit")
    idx = np.concatenate([np.flatnonzero(fit.labels.numpy() == c)[:20] for c in range(10)])
    train = ImageBank(fit.images[idx], fit.labels[idx])
    return build_scenario(train, digits.source("test"), 10, 5, 0, digits.mean, digits.std, digits.classes)
