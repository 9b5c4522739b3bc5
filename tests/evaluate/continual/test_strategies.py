"""The sequential strategies: every one runs end to end on CPU and learns the first experience; on
a stream where naive fine-tuning forgets, replay, LwF, EWC, DER and ER-ACE keep what naive loses;
the registry refuses a second entry of a name; a strategy without the memory it needs, an unknown
one and an excluded one are refused."""
from __future__ import annotations

import pytest
import torch

from cdabench.config import ConfigError
from cdabench.engine.models import create_model
from cdabench.engine.train import ImageBank, to_unit
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
    # Every metric is the accuracy matrix read as documented (metrics.py has the hand computations).
    result = metrics.summarise(outcome.top1, outcome.top5, small.test_counts())
    assert result.accuracy_matrix == outcome.top1 and result.final_accuracy == result.seen_accuracy[-1]


# ----------------------------------------------------------------- retention on a stream where naive forgets
# Two experiences of five digit classes, 12 training images per class, 15 epochs each at Adam's lr
# 0.005 in batches of 16: naive fine-tuning ends knowing the second experience only (its accuracy
# on the first experience's test images is 0.0 in every run measured). LwF and EWC at strong
# settings (alpha 10; lambda 1e6: on so short a stream Avalanche's defaults move nothing measurable).
FORGETTING = SequentialSettings(epochs=15, batch_size=16, lr=0.005, lwf_alpha=10.0, ewc_lambda=1e6)


@torch.no_grad()
def kept_within_old(model, scenario, normalizer) -> float:
    """Top-1 (%) on the first experience's test images among that experience's own classes (chance
    20 %): what the first experience left in the model, whatever the second did to the new classes'
    logits. LwF and EWC protect this, not the class-incremental accuracy, where the new classes'
    logits win (van de Ven et al., "Three types of incremental learning", 2022)."""
    bank, classes = scenario.test_bank(0), torch.tensor(scenario.steps[0])
    model.eval()
    logits = model(normalizer(to_unit(bank.images, torch.device("cpu"))))
    return 100.0 * (classes[logits[:, classes].argmax(1)] == bank.labels).float().mean().item()


def run_two_steps(strategy: str, digits, scenario, cache) -> tuple[list[list[float]], float]:
    """The accuracy matrix of `strategy` on the two-step stream (seed 0) and kept_within_old."""
    models = []

    def make_model():
        models.append(create_model(STUDENT, 10, 1, 8))
        return models[-1]
    memory = ImageBank(scenario.train.images[::5], scenario.train.labels[::5])     # 2-3 images per class
    outcome = run_sequential(scenario, strategy, make_model, FORGETTING, digits.normalizer(), digits.device, 0,
                             cache, memory=memory, mem_size=40)
    return outcome.top1, kept_within_old(models[0], scenario, digits.normalizer())


@pytest.fixture(scope="module")
def naive_two_steps(digits, two_steps, tmp_path_factory):
    return run_two_steps("naive", digits, two_steps, tmp_path_factory.mktemp("cache"))


# The least accuracy (%) on the first experience's test images after the second that a strategy
# with a memory of old images must keep, where naive keeps 0.0: about 10 points under the least
# measured (replay 33.3, DER 56.1, ER-ACE 58.9 over 12 runs). DER's own losses on its buffer
# count: with alpha = beta = 0 (its buffer images only in the batch) it kept 3.9-22.8.
OLD_CLASSES_KEPT = {"replay": 25.0, "der": 45.0, "er_ace": 45.0}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["replay", "lwf", "ewc", "der", "er_ace"])
def test_a_strategy_keeps_what_naive_fine_tuning_forgets(strategy, digits, two_steps, naive_two_steps, tmp_path):
    """Measured on this stream (seed 0 here) over seeds 0-5 with AVX-512 and seeds 0-2 with oneDNN
    held to AVX2 and with ATen's default kernels: naive's accuracy on the first experience after
    the second 0.0 in all 15 runs, its within-old accuracy 6-39 %; within-old >= 52 % for LwF
    (alpha 10; at least 20 points above naive's of the same seed), >= 62 % for the others; each
    strategy >= 55 % on the second experience."""
    naive, naive_kept = naive_two_steps
    assert naive[1][0] <= 1.0, f"naive no longer forgets on this stream: {naive}"
    top1, kept = run_two_steps(strategy, digits, two_steps, tmp_path / "cache")
    assert top1[1][1] >= 40, f"{strategy} did not learn the second experience: {top1}"
    assert kept >= max(45.0, naive_kept + 10), \
        f"{strategy} kept {kept:.1f} % within the old classes, naive {naive_kept:.1f} %"
    if strategy in OLD_CLASSES_KEPT:   # a memory of old images: the old classes still win outright
        assert top1[1][0] >= OLD_CLASSES_KEPT[strategy], \
            f"{strategy}: {top1[1][0]:.1f} % on the first experience after the second ({top1})"


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
