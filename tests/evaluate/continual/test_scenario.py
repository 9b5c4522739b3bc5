"""Class-incremental scenarios: seeded and recorded class orders and steps that leave the global RNG
state alone, refused step counts, and Tiny-ImageNet built offline."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from cdabench.config import ConfigError, load_task
from cdabench.engine.context import open_context
from cdabench.evaluate.continual.scenario import class_order, scenario_for, split_steps
from tests.fixtures import assert_same_rng, global_rng_states, make_tiny_imagenet


# ------------------------------------------------------------------ scenarios
def test_class_order_and_steps_are_seeded_recorded_and_leave_global_rng_alone(digits, tmp_path):
    assert class_order(10, 0) == [int(c) for c in np.random.default_rng(0).permutation(10)]
    assert class_order(10, 0) == class_order(10, 0) and class_order(10, 1) != class_order(10, 0)
    torch.manual_seed(123)
    before = global_rng_states()
    first, second = scenario_for(digits, 5, 0), scenario_for(digits, 5, 0)
    benchmark = first.benchmark(tmp_path / "cache")
    assert_same_rng(before)    # Avalanche's own seed= would have re-seeded torch's global generator
    comp = first.composition()
    assert comp == second.composition()
    assert comp["class_order"] == class_order(10, 0)
    assert comp["steps"] == [comp["class_order"][2 * i:2 * i + 2] for i in range(5)]
    assert sum(comp["train_images"]) == len(digits.source("fit")) and sum(comp["test_images"]) == 360
    streams = list(benchmark.train_stream)
    assert [sorted(e.classes_in_this_experience) for e in streams] == [sorted(s) for s in comp["steps"]]
    x, y, t = streams[0].dataset[0]
    assert x.dtype == torch.float32 and y in comp["steps"][0] and t == 0
    assert [sorted(e.classes_in_this_experience) for e in benchmark.test_stream] == [sorted(s) for s in comp["steps"]]
    assert scenario_for(digits, 5, 1).composition()["class_order"] != comp["class_order"]


def test_steps_that_do_not_divide_the_classes_are_refused(digits):
    assert [len(s) for s in split_steps(list(range(10)), 2)] == [5, 5]
    with pytest.raises(ConfigError, match=r"--steps 3 does not divide the 10 classes .* use one of 1, 2, 5, 10"):
        split_steps(list(range(10)), 3)
    with pytest.raises(ConfigError, match="positive whole number"):
        split_steps(list(range(10)), 0)
    with pytest.raises(ConfigError, match="does not divide"):
        scenario_for(digits, 4, 0)


# -------------------------------------------------------------- Tiny-ImageNet
def test_tiny_imagenet_fixture_loads_offline_and_builds_5x40_and_10x20(tmp_path, monkeypatch):
    make_tiny_imagenet(tmp_path / "data", per_class=2, val_per_class=1)

    def refuse(*args, **kwargs):
        raise OSError("network access blocked in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    task = tmp_path / "tiny-imagenet-8.toml"
    task.write_text('dataset = "tiny-imagenet"\nimage_size = 8\nholdout_per_class = 1\n')
    ctx = open_context(load_task(str(task)), str(tmp_path / "data"), "cpu", tmp_path / "cache")
    assert ctx.num_classes == 200
    for steps, per_step in ((5, 40), (10, 20)):
        scenario = scenario_for(ctx, steps, 0)
        benchmark = scenario.benchmark(tmp_path / "cache")
        experiences = list(benchmark.train_stream)
        assert len(experiences) == steps
        assert all(len(e.classes_in_this_experience) == per_step for e in experiences)
        assert sorted(c for s in scenario.steps for c in s) == list(range(200))
    with pytest.raises(ConfigError, match="--steps 3 does not divide the 200 classes"):
        scenario_for(ctx, 3, 0)
    assert list((tmp_path / "home").iterdir()) == []       # nothing written to the (fake) home
