"""The `retrain` protocol (SRe2L section 3.7, reused by CDA): at every step a FRESH student is
trained from scratch, with online KD from the teacher, on the memory images of all classes seen so
far, and tested on the test images of every experience (the seen ones count).

The papers' teacher was trained on all classes, so its soft labels tell the student about classes
that have not arrived yet. We mask them: the teacher's logits of unseen classes are set to -inf
before the softmax, so those classes get probability exactly 0 in every target (`masked=True`, the
default, recorded). `masked=False` reproduces the papers' leaky variant for comparison.
Nothing can be forgotten under this protocol (each step starts from scratch); its "forgetting" is
the accuracy an old experience loses to the interference of newer classes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from cdabench.engine.labels import OnlineKD
from cdabench.engine.runtime import prepare_model
from cdabench.engine.train import ImageBank, Normalizer, train_model
from cdabench.evaluate.continual.scenario import Scenario, evaluate_experiences, subset_by_classes
from cdabench.schema import KDConfig, TrainRecipe


@dataclass
class ProtocolOutcome:
    """What one protocol run measured: the matrices (rows = after step i) and its costs."""

    top1: list[list[float]] = field(default_factory=list)
    top5: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    eval_seconds: float = 0.0
    teacher_forwards: int = 0
    steps: list[dict] = field(default_factory=list)    # per step: images, classes, final loss


def class_mask(num_classes: int, classes, device=None) -> torch.Tensor:
    """True for the given (seen) classes: the teacher's other logits are masked."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    mask[torch.as_tensor(list(classes), dtype=torch.long, device=device)] = True
    return mask


def kd_source(recipe: TrainRecipe, kd: KDConfig, image_size: int, teacher: nn.Module, normalizer: Normalizer,
              num_classes: int, seen: list[int], masked: bool, precision: str = "fp32") -> OnlineKD:
    """Online KD for one step: the teacher restricted to the seen classes when `masked`."""
    mask = class_mask(num_classes, seen) if masked else None
    return OnlineKD(recipe.augment, image_size, teacher, normalizer, kd.temperature, kd.t_squared, class_mask=mask,
                    precision=precision)


def run_retrain(scenario: Scenario, memory_bank: ImageBank, teacher: nn.Module, make_model: Callable[[], nn.Module],
                recipe: TrainRecipe, kd: KDConfig, normalizer: Normalizer, device: torch.device, seed: int,
                image_size: int, masked: bool = True, description: str = "retrain",
                precision: str = "fp32", on_epoch: Callable | None = None,
                on_step: Callable | None = None) -> ProtocolOutcome:
    """Every step: a fresh `make_model()` (seeded with `seed`), trained for `recipe.epochs` on the
    memory of the seen classes, then scored on every experience's test images.
    `on_epoch(step, entry)`: every epoch's history entry (train_model); `on_step(step, top1_row)`:
    each step's accuracies (a logger run, evaluate/continual/cell.py)."""
    outcome = ProtocolOutcome()
    for step in range(scenario.num_steps):
        seen = scenario.seen_classes(step)
        bank = subset_by_classes(memory_bank, seen)
        if len(bank) == 0:
            raise ValueError(f"the memory holds no images of the classes of step {step}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = prepare_model(make_model(), device)
        labels = kd_source(recipe, kd, image_size, teacher, normalizer, scenario.num_classes, seen, masked, precision)
        # (train_model drops a last mini-batch of one image, which would break BatchNorm at 1x1.)
        hook = None if on_epoch is None else (lambda entry, _model, step=step: on_epoch(step, entry))
        result = train_model(model, bank, labels, recipe, normalizer, device, seed, image_size,
                             description=f"{description} step {step + 1}/{scenario.num_steps}", on_epoch=hook,
                             precision=precision)
        start = time.perf_counter()
        top1, top5 = evaluate_experiences(model, scenario, normalizer, device, precision)
        outcome.eval_seconds += time.perf_counter() - start
        outcome.top1.append(top1)
        outcome.top5.append(top5)
        if on_step is not None:
            on_step(step, top1)
        outcome.seconds += result.seconds
        outcome.teacher_forwards += result.teacher_forwards
        outcome.steps.append({"step": step, "images": len(bank), "classes": len(seen),
                              "batch_size": recipe.batch_size,
                              "final_loss": result.history[-1]["loss"] if result.history else None})
    return outcome
