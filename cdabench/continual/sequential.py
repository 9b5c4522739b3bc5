"""The `sequential` protocol: ONE model trained through the experience stream with Avalanche
strategies, scored after every experience by our own evaluation (evaluate_model on the test
images of each experience), which fills the accuracy matrix. No Avalanche metric is used.

Strategies (avalanche-lib 0.6.0, its current benchmark API):
- `naive`: fine-tuning, the lower bound;
- `replay`: Naive + our memory plugin: after experience i the `ipc` memory images of each of its
  classes (random or herding exemplars, or a method's distilled images) join the memory, and every
  later mini-batch is a stream batch plus a memory batch (`ReplayDataLoader` with
  `oversample_small_tasks=True`, so a small memory is cycled, not exhausted after a few batches);
- `gdumb`, `der`, `er_ace`: Avalanche's own buffers, filled from the stream, `mem_size = ipc x classes`;
- `lwf`, `ewc`: regularisation, no memory.
iCaRL and the strategies broken with torch 2.14 are excluded (EXCLUDED gives the reasons).
"""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cdabench import progress
from cdabench.config import ConfigError
from cdabench.continual import avalanche_env
from cdabench.continual.retrain import ProtocolOutcome
from cdabench.continual.scenario import Scenario, avalanche_dataset, evaluate_experiences, subset_by_classes
from cdabench.distill.train import ImageBank, Normalizer
from cdabench.schema import SEQUENTIAL_STRATEGIES, SequentialSettings

STRATEGIES = SEQUENTIAL_STRATEGIES
MEMORY_STRATEGIES = ("replay",)                 # fed by a memory source (random, herding, cda, sre2l)
OWN_BUFFER_STRATEGIES = ("gdumb", "der", "er_ace")  # Avalanche's buffers, mem_size = ipc x classes
EXCLUDED = {
    "icarl": "avalanche-lib 0.6.0's ICaRL reads experience.benchmark.n_classes_per_exp and .classes_order, "
             "which exist only on the legacy nc_benchmark scenarios; on the current class_incremental_benchmark "
             "it fails with AttributeError: 'DatasetExperience' object has no attribute 'benchmark'",
    "bic": "passes verbose= to torch's MultiStepLR, which torch 2.14 no longer accepts",
    "gem": "needs the quadprog QP solver (qpsolvers finds none installed)",
    "er_aml": "hangs in avalanche-lib 0.6.0",
}


def check_strategy(name: str) -> None:
    if name in STRATEGIES:
        return
    if name in EXCLUDED:
        raise ConfigError(f"strategy {name!r} is excluded: {EXCLUDED[name]}. Use one of {', '.join(STRATEGIES)}")
    raise ConfigError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)} "
                      f"(excluded, see docs/continual.md: {', '.join(sorted(EXCLUDED))})")


def memory_kind(strategy: str) -> str:
    """'source' (a memory source fills it), 'own-buffer' (the strategy's buffer) or 'none'."""
    if strategy in MEMORY_STRATEGIES:
        return "source"
    return "own-buffer" if strategy in OWN_BUFFER_STRATEGIES else "none"


_CLASSES: dict = {}


def _memory_classes(av):
    """Our buffer and plugin, subclassing Avalanche's (defined once Avalanche is imported)."""
    if _CLASSES:
        return _CLASSES["buffer"], _CLASSES["plugin"]

    class SourceMemoryBuffer(av.ExemplarsBuffer):
        """A fixed per-class memory: after each experience, the memory images of its classes are
        added (the buffer holds `ipc` images of every class seen so far)."""

        def __init__(self, memory: ImageBank, mean, std):
            super().__init__(max_size=len(memory))
            self.memory, self.mean, self.std = memory, mean, std
            self.classes: list[int] = []

        def post_adapt(self, agent_state, exp):
            self.classes += [int(c) for c in sorted(exp.classes_in_this_experience) if int(c) not in self.classes]
            self.buffer = avalanche_dataset(av, subset_by_classes(self.memory, self.classes), self.mean, self.std)

        def resize(self, strategy, new_size):
            raise ValueError("this memory holds a fixed number of images per class; it cannot be resized")

    class SourceReplayPlugin(av.SupervisedPlugin):
        def __init__(self, buffer: SourceMemoryBuffer, batch_size_mem: int):
            super().__init__()
            self.storage_policy, self.batch_size_mem = buffer, batch_size_mem

        def before_training_exp(self, strategy, num_workers: int = 0, shuffle: bool = True,
                                drop_last: bool = False, **kwargs):
            memory = self.storage_policy.buffer
            if len(memory) == 0:
                return
            # A memory batch never larger than the memory: with drop_last a larger one yields no batch at all.
            strategy.dataloader = av.ReplayDataLoader(
                strategy.adapted_dataset, memory, oversample_small_tasks=True,
                batch_size=strategy.train_mb_size, batch_size_mem=min(self.batch_size_mem, len(memory)),
                num_workers=num_workers, shuffle=shuffle, drop_last=drop_last)

        def after_training_exp(self, strategy, **kwargs):
            self.storage_policy.post_adapt(strategy, strategy.experience)

    _CLASSES.update(buffer=SourceMemoryBuffer, plugin=SourceReplayPlugin)
    return SourceMemoryBuffer, SourceReplayPlugin


def make_optimizer(model: nn.Module, settings: SequentialSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def make_strategy(av, name: str, model: nn.Module, settings: SequentialSettings, device: torch.device,
                  mem_size: int = 0, memory: ImageBank | None = None, mean=None, std=None):
    check_strategy(name)
    common = dict(model=model, optimizer=make_optimizer(model, settings), criterion=nn.CrossEntropyLoss(),
                  train_mb_size=settings.batch_size, train_epochs=settings.epochs, eval_mb_size=256,
                  device=device, evaluator=av.EvaluationPlugin(loggers=[]), eval_every=-1)
    if name == "naive":
        return av.Naive(**common)
    if name == "replay":
        if memory is None:
            raise ConfigError("strategy replay needs a memory source (random, herding, cda, sre2l)")
        buffer_cls, plugin_cls = _memory_classes(av)
        plugin = plugin_cls(buffer_cls(memory, mean, std), settings.batch_size)
        return av.Naive(plugins=[plugin], **common)
    if name in OWN_BUFFER_STRATEGIES and mem_size < 1:
        raise ConfigError(f"strategy {name} needs mem_size >= 1")
    if name == "gdumb":
        return av.GDumb(mem_size=mem_size, **common)
    batch_size_mem = min(settings.batch_size, mem_size)   # their buffer loaders drop the last partial batch
    if name == "der":
        return av.DER(mem_size=mem_size, batch_size_mem=batch_size_mem, alpha=settings.der_alpha,
                      beta=settings.der_beta, **common)
    if name == "er_ace":
        return av.ER_ACE(mem_size=mem_size, batch_size_mem=batch_size_mem, **common)
    if name == "lwf":
        return av.LwF(alpha=settings.lwf_alpha, temperature=settings.lwf_temperature, **common)
    if name == "ewc":
        return av.EWC(ewc_lambda=settings.ewc_lambda, **common)
    raise AssertionError(name)


def drop_last(strategy: str, batch_size: int, mem_size: int, seen_images: int) -> bool:
    """Whether the training loader drops its last partial mini-batch. A last batch of ONE image
    breaks BatchNorm on 1x1 feature maps (ResNets at 8 px), so stream loaders drop it (each
    experience holds at least one full batch, and the shuffled remainder changes every epoch).
    GDumb trains on its buffer only, which may be smaller than a batch: it keeps the partial
    batch unless that batch would be a single image."""
    if strategy != "gdumb":
        return True
    return min(mem_size, seen_images) % batch_size == 1


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device):
    """Seed python, numpy and torch for Avalanche code (its loaders and buffers use the global
    generators) and give every global state back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def run_sequential(scenario: Scenario, strategy: str, make_model: Callable[[], nn.Module],
                   settings: SequentialSettings, normalizer: Normalizer, device: torch.device, seed: int,
                   cache: str | Path, memory: ImageBank | None = None, mem_size: int = 0,
                   description: str = "sequential", on_step=None) -> ProtocolOutcome:
    """Train one model through the stream with `strategy`; after each experience, score it on the
    test images of every experience. `memory`: the replay memory (all classes, `ipc` each);
    `mem_size`: the buffer size of gdumb/der/er_ace."""
    check_strategy(strategy)
    sizes = [int(n) for n in scenario.composition()["train_images"]]
    if min(sizes) < settings.batch_size:
        raise ConfigError(f"an experience holds only {min(sizes)} training images, fewer than the sequential "
                          f"batch_size {settings.batch_size}: lower [sequential] batch_size")
    av = avalanche_env.load(cache)
    benchmark = scenario.benchmark(cache)
    outcome = ProtocolOutcome()
    with isolated_rng(seed, device):
        model = make_model()
        with avalanche_env.quiet():
            agent = make_strategy(av, strategy, model, settings, device, mem_size, memory, scenario.mean, scenario.std)
        with progress.track(description, scenario.num_steps) as bar:
            for i, experience in enumerate(benchmark.train_stream):
                start = time.perf_counter()
                with avalanche_env.quiet():
                    agent.train(experience, num_workers=0,
                                drop_last=drop_last(strategy, settings.batch_size, mem_size, sum(sizes[:i + 1])))
                outcome.seconds += time.perf_counter() - start
                start = time.perf_counter()
                top1, top5 = evaluate_experiences(agent.model, scenario, normalizer, device)
                outcome.eval_seconds += time.perf_counter() - start
                outcome.top1.append(top1)
                outcome.top5.append(top5)
                outcome.steps.append({"step": i, "images": len(experience.dataset),
                                      "classes": len(scenario.seen_classes(i))})
                bar.advance(1, f"step {i + 1}: top-1 {top1[i]:.1f}% on its own classes")
                if on_step is not None:
                    on_step(i, agent)
    return outcome
