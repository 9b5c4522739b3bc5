"""The training loop's pieces: the fused optimisers do the textbook update."""
from __future__ import annotations

import math

import pytest
import torch

from cdabench.engine.augment import AugmentSpec
from cdabench.engine.labels import HardLabels
from cdabench.engine.train import ImageBank, Normalizer, TrainingDiverged, make_optimizer, train_model
from cdabench.schema import TrainRecipe
from tests.fixtures import make_tiny_bn_net


def test_fused_adamw_step_equals_the_formula():
    """First AdamW step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected to g and g^2, so
    p <- p (1 - lr wd) - lr g / (|g| + eps); decay only on matrices (decay_matrices_only)."""
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        lin.bias.fill_(0.5)
    recipe = TrainRecipe(optimizer="adamw", lr=0.1, weight_decay=0.2, decay_matrices_only=True)
    opt = make_optimizer(lin, recipe)
    lin.weight.grad = torch.tensor([[0.3, -0.04]])
    lin.bias.grad = torch.tensor([2.0])
    opt.step()
    eps = 1e-8
    want_w = [1.0 * (1 - 0.1 * 0.2) - 0.1 * 0.3 / (0.3 + eps), -2.0 * (1 - 0.1 * 0.2) + 0.1 * 0.04 / (0.04 + eps)]
    assert lin.weight.detach().view(-1).tolist() == pytest.approx(want_w, abs=1e-6)
    assert lin.bias.item() == pytest.approx(0.5 - 0.1 * 1.0, abs=1e-6)   # no decay on the bias
    assert math.isclose(opt.param_groups[1]["weight_decay"], 0.0)


def test_fused_sgd_step_equals_the_formula():
    """SGD with momentum, first step: buf = g + wd p, p <- p - lr buf."""
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    opt = make_optimizer(lin, TrainRecipe(optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=0.1))
    lin.weight.grad = torch.tensor([[1.0]])
    opt.step()
    assert lin.weight.item() == pytest.approx(2.0 - 0.5 * (1.0 + 0.1 * 2.0))
    lin.weight.grad = torch.tensor([[1.0]])
    opt.step()  # buf = 0.9 * 1.2 + (1 + 0.1 * 1.4) = 2.22
    assert lin.weight.item() == pytest.approx(1.4 - 0.5 * 2.22)


def test_a_diverged_training_run_stops_with_a_clear_error():
    """A loss that becomes NaN or infinite stops the run at the end of that epoch with the cause
    and the fixes, instead of training on (a NaN teacher would later fail the class-order guard
    with a misleading message about the class order)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8)
    bank = ImageBank(images, torch.arange(24) % 3)
    recipe = TrainRecipe(epochs=3, batch_size=8, optimizer="sgd", lr=1e30, momentum=0.0, weight_decay=0.0,
                         warmup_epochs=0, schedule="constant", augment=AugmentSpec(crop="none", flip=False))
    labels = HardLabels(recipe.augment, 8)
    with pytest.raises(TrainingDiverged, match=r"tiny net: the mean loss of epoch 1 is (nan|inf) .*lr 1e\+30.*"
                                               r"training diverged.*use --precision fp32"):
        train_model(make_tiny_bn_net(), bank, labels, recipe, Normalizer((0.5,), (0.5,), torch.device("cpu")),
                    torch.device("cpu"), 0, 8, description="tiny net")
