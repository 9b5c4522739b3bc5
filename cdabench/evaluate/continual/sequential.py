"""The `sequential` protocol: ONE model trained through the experience stream with Avalanche
strategies, scored after every experience by our own evaluation (evaluate_model on the test
images of each experience), which fills the accuracy matrix. No Avalanche metric is used.

The strategies, one registry entry each, are in cdabench/evaluate/continual/strategies.py.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cdabench import progress
from cdabench.config import ConfigError
from cdabench.engine.train import ImageBank, Normalizer
from cdabench.engine.watch import check_loggers, require, wandb_init_kwargs
from cdabench.evaluate.continual import avalanche_env
from cdabench.evaluate.continual.retrain import ProtocolOutcome
from cdabench.evaluate.continual.scenario import Scenario, evaluate_experiences
from cdabench.evaluate.continual.strategies import check_strategy, create_strategy, strategy_entry
from cdabench.schema import SequentialSettings


def drop_last(strategy: str, batch_size: int, mem_size: int, seen_images: int) -> bool:
    """Whether the training loader drops its last partial mini-batch. A last batch of ONE image
    breaks BatchNorm on 1x1 feature maps (ResNets at 8 px), so stream loaders drop it (each
    experience holds at least one full batch, and the shuffled remainder changes every epoch).
    A strategy that trains on its buffer only (GDumb), which may be smaller than a batch, keeps
    the partial batch unless that batch would be a single image."""
    if not strategy_entry(strategy).buffer_only:
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
                   description: str = "sequential", loggers: list | None = None,
                   on_step: Callable | None = None) -> ProtocolOutcome:
    """Train one model through the stream with `strategy`; after each experience, score it on the
    test images of every experience. `memory`: the replay memory (all classes, `ipc` each);
    `mem_size`: the buffer size of gdumb/der/er_ace. `loggers`: Avalanche loggers (their run logs
    the strategy's epoch loss and accuracy, avalanche_loggers); `on_step(step, top1_row,
    iteration)`: each experience's accuracies and the strategy's training-iteration clock."""
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
            agent = create_strategy(av, strategy, model, settings, device, mem_size, memory, scenario.mean, scenario.std,
                                    loggers)
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
                if on_step is not None:
                    on_step(i, top1, agent.clock.train_iterations)
                outcome.steps.append({"step": i, "images": len(experience.dataset),
                                      "classes": len(scenario.seen_classes(i))})
                bar.advance(1, f"step {i + 1}: top-1 {top1[i]:.1f}% on its own classes")
    return outcome


def avalanche_loggers(watch, name: str, config: dict) -> list:
    """Avalanche's own loggers for one sequential cell, one run each, as `watch.loggers` asks:
    its TensorboardLogger (event files in <run folder>/tensorboard/<name>/) and its WandBLogger
    (W&B offline, engine/watch.py). `close_avalanche_loggers` ends the runs."""
    if watch is None or not watch.loggers:
        return []
    check_loggers(watch.loggers)
    with avalanche_env.quiet():
        from avalanche.logging import TensorboardLogger, WandBLogger
    loggers = []
    if "tensorboard" in watch.loggers:
        tensorboard = TensorboardLogger(tb_log_dir=Path(watch.log_dir) / "tensorboard" / name)
        tensorboard.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")
        loggers.append(tensorboard)
    if "wandb" in watch.loggers:
        kwargs = wandb_init_kwargs(require("wandb"), watch.log_dir, name, config)
        loggers.append(WandBLogger(project_name=kwargs.pop("project"), run_name=kwargs.pop("name"), save_code=False,
                                   config=kwargs.pop("config"), dir=kwargs.pop("dir"), params=kwargs))
    return loggers


def close_avalanche_loggers(loggers: list) -> None:
    for logger in loggers:
        if hasattr(logger, "writer"):
            logger.writer.close()
        else:
            logger.wandb.finish()
