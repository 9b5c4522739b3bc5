"""The retrain protocol: the masking fix removes what the teacher knows of unseen classes."""
from __future__ import annotations

import numpy as np
import torch

from cdabench.config import load_task
from cdabench.engine.labels import HardLabels
from cdabench.engine.models import create_model
from cdabench.engine.train import evaluate_model, train_model
from cdabench.evaluate.continual.retrain import kd_source, run_retrain
from cdabench.schema import AugmentSpec, TrainRecipe

STUDENT = "test_resnet"   # timm's 0.37 M-parameter ResNet: ~10x cheaper per step than ResNet-18 at 8 px


# ------------------------------------------------------------------- masking
def test_masking_removes_unseen_class_knowledge(digits, small):
    torch.manual_seed(0)
    teacher = create_model(STUDENT, 10, 1, 8)
    recipe = TrainRecipe(model=STUDENT, epochs=3, batch_size=64, lr=0.05, warmup_epochs=1,
                         augment=AugmentSpec(crop="none", flip=False))
    train_model(teacher, digits.source("fit"), HardLabels(recipe.augment, 8), recipe, digits.normalizer(),
                digits.device, 0, 8, description="teacher")
    teacher.eval()
    assert evaluate_model(teacher, digits.source("test"), digits.normalizer(), digits.device)["top1"] > 80
    seen = small.seen_classes(0)
    unseen = [c for c in range(10) if c not in seen]
    memory = small.train_bank(0)
    student_recipe = TrainRecipe(model=STUDENT, epochs=25, batch_size=20, optimizer="adamw", lr=0.003,
                                 augment=AugmentSpec(crop="rrc", min_scale=0.5, flip=False))
    probs = {}
    for masked in (False, True):
        source = kd_source(student_recipe, load_task("digits").posttrain.kd, 8, teacher, digits.normalizer(), 10,
                           seen, masked)
        _, targets = source.prepare(memory.images[:20].float() / 255, memory.labels[:20], None, 0,
                                    np.random.default_rng(0), memory)
        unseen_mass = targets[:, unseen].sum(dim=1)
        if masked:
            assert torch.equal(unseen_mass, torch.zeros_like(unseen_mass))      # exactly zero
            assert torch.allclose(targets.sum(dim=1), torch.ones(20))
        else:
            assert unseen_mass.min() > 1e-3      # the papers' teacher tells the student about future classes
        torch.manual_seed(0)
        student = create_model(STUDENT, 10, 1, 8)
        train_model(student, memory, source, student_recipe, digits.normalizer(), digits.device, 0, 8)
        student.eval()
        x = digits.normalizer()(small.test_bank(0).images.float() / 255)
        with torch.no_grad():
            probs[masked] = torch.softmax(student(x), dim=1)[:, unseen].sum(dim=1).mean().item()
    assert probs[True] < probs[False] / 2, probs
    # The protocol end to end: a masked student never predicts an unseen class, the unmasked one may.
    outcome = run_retrain(small, memory, teacher, lambda: create_model(STUDENT, 10, 1, 8),
                          student_recipe, load_task("digits").posttrain.kd, digits.normalizer(), digits.device, 0, 8,
                          masked=True)
    assert len(outcome.top1) == 5 and outcome.top1[0][0] > 50
    assert outcome.teacher_forwards > 0
