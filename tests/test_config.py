"""Per-student protocols and the model adaptations they name: TOML overrides resolve as declared
(the shared recipe, a student's own settings, the `full` baseline's), the small-image strides and
patches give the feature maps the docs promise, and the fused optimiser does the textbook update."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdabench.config import ConfigError, load_method, load_task
from cdabench.engine.models import MODELS, create_model, describe_adaptation, mobilenetv2_stride1_stages, register_model
from cdabench.engine.train import make_optimizer
from cdabench.schema import TrainRecipe

REPO = Path(__file__).resolve().parents[1]

TASK = """\
dataset = "digits"
image_size = 8
holdout_fraction = 0.1

[posttrain]
full_epochs = 3
full_batch_size = 50

[posttrain.recipe]
epochs = 30
batch_size = 100
optimizer = "adamw"
lr = 0.01
augment = { crop = "rrc", min_scale = 0.25, flip = true }

[posttrain.students.resnet50]
epochs = 12
full_epochs = 4

[posttrain.students.deit_tiny]
patch_size = 4
lr = 0.001
full_batch_size = 25
augment = { crop = "rrc", min_scale = 0.5, flip = false }
"""


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(TASK)
    return load_task(str(path))


def test_shared_recipe_student_overrides_and_full(task):
    pt = task.posttrain
    r18, r18_full = pt.recipe_for("resnet18"), pt.recipe_for("resnet18", full=True)
    assert (r18.model, r18.epochs, r18.batch_size, r18.lr, r18.patch_size) == ("resnet18", 30, 100, 0.01, None)
    assert (r18_full.epochs, r18_full.batch_size) == (3, 50)              # the task's full settings
    r50, r50_full = pt.recipe_for("resnet50"), pt.recipe_for("resnet50", full=True)
    assert (r50.epochs, r50.batch_size) == (12, 100)
    assert (r50_full.epochs, r50_full.batch_size) == (4, 50)              # the student's full_epochs wins
    deit, deit_full = pt.recipe_for("deit_tiny"), pt.recipe_for("deit_tiny", full=True)
    assert (deit.epochs, deit.lr, deit.patch_size, deit.augment.min_scale, deit.augment.flip) == (30, 0.001, 4, 0.5, False)
    assert (deit_full.epochs, deit_full.batch_size, deit_full.lr) == (3, 25, 0.001)
    # An override never leaks into the shared recipe or another student.
    assert pt.recipe.augment.min_scale == 0.25 and pt.recipe_for("mobilenetv2").augment.flip


def test_equal_steps_ipc_scales_epochs_by_steps_per_epoch(tmp_path):
    """Under equal_steps_ipc a cell at any IPC trains the optimiser steps of a cell at that IPC:
    epochs x ceil(ref images / batch) / ceil(images / batch), rounded up; full data is untouched."""
    path = tmp_path / "t.toml"
    path.write_text(TASK.replace("[posttrain]\n", "[posttrain]\nequal_steps_ipc = 10\n"))
    pt = load_task(str(path)).posttrain
    assert pt.equal_steps_ipc == 10
    # batch 100, 10 classes: IPC 10 = 1 step per epoch, as is IPC 1 (10 images): the same epochs.
    assert pt.recipe_for("resnet18", images=100, classes=10).epochs == 30
    assert pt.recipe_for("resnet18", images=10, classes=10).epochs == 30
    # 50 classes: the reference set is 500 images = 5 steps per epoch; 50 images = 1 step -> 5x the epochs.
    assert pt.recipe_for("resnet18", images=50, classes=50).epochs == 30 * 5
    # 230 images = 3 steps per epoch: 30 x 5 / 3 = 50 epochs.
    assert pt.recipe_for("resnet18", images=230, classes=50).epochs == 50
    assert pt.recipe_for("resnet50", images=50, classes=50).epochs == 12 * 5   # the student's own epochs, scaled
    assert pt.recipe_for("resnet18", full=True, images=1293, classes=10).epochs == 3
    assert load_task(str(tmp_path / "t.toml")).posttrain.recipe_for("resnet18").epochs == 30  # no set size: as written
    digits = load_task("digits").posttrain
    assert digits.recipe_for("resnet18", images=10, classes=10).epochs == 4 * digits.recipe_for("resnet18").epochs


def test_equal_steps_ipc_must_be_positive(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(TASK.replace("[posttrain]\n", "[posttrain]\nequal_steps_ipc = 0\n"))
    with pytest.raises((ConfigError, ValueError), match="equal_steps_ipc must be a positive IPC"):
        load_task(str(path))


def test_unknown_student_setting_is_refused(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(TASK + "\n[posttrain.students.mobilenetv2]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"posttrain\.students\.mobilenetv2: unknown key\(s\) learning_rate; known keys: .*lr"):
        load_task(str(path))


def test_the_embedded_default_sets_every_panel_student():
    """Every student of the cross-arch panel has its own held-out-tuned settings on digits."""
    pt = load_task("digits").posttrain
    assert {"resnet50", "mobilenetv2", "deit_tiny"} <= set(pt.students)
    assert pt.recipe_for("deit_tiny").patch_size == 4


@pytest.mark.parametrize("size, stages, side", [(8, [1, 2], 2), (16, [1], 2), (32, [], 2), (64, [], 4)])
def test_mobilenetv2_keeps_a_2x2_last_map(size, stages, side):
    assert mobilenetv2_stride1_stages(size) == stages
    model = create_model("mobilenetv2", 10, 1, size).eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 1, size, size)).shape[-2:] == (side, side)
    assert describe_adaptation("mobilenetv2", size).endswith(f"stride-1 stages {stages}" if stages else "stride-1 stem")


def test_deit_patch_size():
    assert create_model("deit_tiny", 10, 1, 8).patch_embed.grid_size == (8, 8)           # the registry's default
    assert create_model("deit_tiny", 10, 1, 8, patch_size=4).patch_embed.grid_size == (2, 2)
    assert describe_adaptation("deit_tiny", 8, 4) == "deit_tiny_patch16_224, img_size 8, patch 4"
    with pytest.raises(ValueError, match="does not divide the image size 8"):
        create_model("deit_tiny", 10, 1, 8, patch_size=3)
    with pytest.raises(ValueError, match="no patches; only deit_tiny"):
        create_model("resnet18", 10, 1, 8, patch_size=4)


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


def test_the_model_registry_refuses_a_second_entry_of_a_name():
    entry = MODELS["resnet18"]
    with pytest.raises(ValueError, match=r"model 'resnet18' is already registered \(timm ResNet.*pick another name"):
        register_model("resnet18", "resnet34", "another resnet18", lambda timm_name, size: timm_name)(lambda *args: None)
    assert MODELS["resnet18"] is entry


def test_a_method_file_that_takes_a_packaged_name_is_refused(tmp_path):
    """Records name their method: a user's file may not reuse a packaged method's name."""
    select = 'kind = "select"\nstrategy = "random"\n'
    (tmp_path / "random.toml").write_text(select)
    with pytest.raises(ConfigError, match=r"random.toml declares method 'random', the name of the packaged method"):
        load_method(str(tmp_path / "random.toml"))
    (tmp_path / "mine.toml").write_text('name = "cda"\n' + select)
    with pytest.raises(ConfigError, match=r"declares method 'cda', the name of the packaged method in .*CDA"):
        load_method(str(tmp_path / "mine.toml"))
    (tmp_path / "my-random.toml").write_text(select)
    assert load_method(str(tmp_path / "my-random.toml")).name == "my-random"
    packaged_random = load_method("random")
    assert load_method(packaged_random.path) == packaged_random     # the packaged file by its path is itself


def test_two_packaged_methods_of_one_name_are_refused(tmp_path):
    """A baseline file named like the built-in CDA, shipped in a copy of the package."""
    shutil.copytree(REPO / "cdabench", tmp_path / "cdabench", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "cdabench" / "builtin" / "baselines" / "cda.toml").write_text('kind = "select"\nstrategy = "random"\n')
    code = "from cdabench import config; print(config.list_methods())"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "two methods are named 'cda': cdabench/config.py (CDA) and " in done.stderr
    assert "builtin/baselines/cda.toml; rename one" in done.stderr
