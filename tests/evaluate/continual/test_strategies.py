"""The sequential strategies: every one runs end to end on CPU and learns the first experience; the
registry refuses a second entry of a name; a strategy without the memory it needs, an unknown one
and an excluded one are refused."""
from __future__ import annotations

import pytest

from cdabench.config import ConfigError
from cdabench.engine.models import create_model
from cdabench.engine.train import ImageBank
from cdabench.evaluate.continual import avalanche_env, metrics
from cdabench.evaluate.continual.sequential import SequentialSettings, run_sequential
from cdabench.evaluate.continual.strategies import (check_strategy, create_strategy, list_strategies, memory_kind,
                                                    register_strategy)
from cdabench.harness.continual import strategies, validate
from cdabench.schema import ContinualSuite
from tests.fixtures import assert_same_rng, global_rng_states

STUDENT = "test_resnet"   # timm's 0.37 M-parameter ResNet: ~10x cheaper per step than ResNet-18 at 8 px


# ----------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy", list_strategies())
def test_every_strategy_runs_and_learns_the_first_experience(strategy, digits, small, tmp_path):
    memory = ImageBank(small.train.images[::5], small.train.labels[::5])      # 4 images per class
    settings = SequentialSettings(epochs=6, batch_size=16, lr=0.003)
    before = global_rng_states()
    outcome = run_sequential(small, strategy, lambda: create_model(STUDENT, 10, 1, 8), settings,
                             digits.normalizer(), digits.device, 0, tmp_path / "cache", memory=memory, mem_size=40)
    assert_same_rng(before)
    assert len(outcome.top1) == 5 and all(len(row) == 5 for row in outcome.top1)
    # chance on the 2 classes of the first experience is 50 % (10 % over all outputs)
    assert outcome.top1[0][0] > 60, outcome.top1
    result = metrics.summarise(outcome.top1, outcome.top5, small.test_counts())
    assert 0 <= result.final_accuracy <= 100


def test_the_strategy_registry_refuses_a_second_entry_of_a_name():
    before = list_strategies()
    with pytest.raises(ValueError, match=r"strategy 'naive' is already registered \(fine-tuning.*pick another name"):
        register_strategy("naive", "none", "another naive")(lambda av, common, settings, memory: None)
    with pytest.raises(ValueError, match="memory must be one of source, own-buffer, none"):
        register_strategy("mine", "buffer", "a strategy with an unknown memory kind")
    assert list_strategies() == before
    # A continual suite that lists no strategies runs every registered one, in registration order.
    assert strategies(ContinualSuite(name="x")) == tuple(before)
    assert {s: memory_kind(s) for s in before} == {"naive": "none", "replay": "source", "gdumb": "own-buffer",
                                                   "lwf": "none", "ewc": "none", "der": "own-buffer",
                                                   "er_ace": "own-buffer"}


def test_a_strategy_without_the_memory_it_needs_is_refused(digits, tmp_path):
    av = avalanche_env.load(tmp_path / "cache")
    settings = SequentialSettings()
    with pytest.raises(ConfigError, match="strategy replay needs a memory source"):
        create_strategy(av, "replay", create_model(STUDENT, 10, 1, 8), settings, digits.device)
    for name in ("gdumb", "der", "er_ace"):
        with pytest.raises(ConfigError, match=f"strategy {name} needs mem_size >= 1"):
            create_strategy(av, name, create_model(STUDENT, 10, 1, 8), settings, digits.device, mem_size=0)


def test_unknown_and_excluded_strategies_are_refused():
    with pytest.raises(ConfigError, match=r"unknown strategy 'magic': use one of naive, replay"):
        check_strategy("magic")
    with pytest.raises(ConfigError, match=r"strategy 'icarl' is excluded: .*nc_benchmark"):
        check_strategy("icarl")
    with pytest.raises(ConfigError, match="unknown strategy 'magic'"):
        validate(ContinualSuite(name="x", strategies=("naive", "magic")))
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        validate(ContinualSuite(name="x", memories=("random", "magic")))
    with pytest.raises(ConfigError, match="memory 'full'"):
        validate(ContinualSuite(name="x", memories=("full",)))
    with pytest.raises(ConfigError, match="unknown protocol"):
        validate(ContinualSuite(name="x", protocols=("replay",)))
    with pytest.raises(ConfigError, match="not among the retrain memories"):
        validate(ContinualSuite(name="x", memories=("random",), unmasked=("cda",)))
