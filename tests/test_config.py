"""Configuration (cdabench/config.py): per-student protocols resolve as declared (the shared recipe,
a student's own settings, the `full` baseline's, equal steps across IPCs); unknown keys and method
files that take a packaged name are refused; the papers' tasks' precision and the shrunk digits
task's methods; the held-out split set from the command line."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from cdabench.config import ConfigError, load_method, load_task, recover_config
from tests.fixtures import REPO, child_env, make_tiny_imagenet, run_cli, tiny_task_file

# The base tiny task (tests/fixtures.py) with a post-train protocol that overrides per student.
POSTTRAIN = {
    "full_epochs": 3, "full_batch_size": 50,
    "recipe": {"epochs": 30, "batch_size": 100, "optimizer": "adamw", "lr": 0.01,
               "augment": {"crop": "rrc", "min_scale": 0.25, "flip": True}},
    "students": {"resnet50": {"epochs": 12, "full_epochs": 4},
                 "deit_tiny": {"patch_size": 4, "lr": 0.001, "full_batch_size": 25,
                               "warmup_epochs": 29, "full_warmup_epochs": 1, "full_lr": 0.0005,
                               "augment": {"crop": "rrc", "min_scale": 0.5, "flip": False}}},
}


@pytest.fixture
def task(tmp_path):
    return load_task(str(tiny_task_file(tmp_path / "t.toml", posttrain=POSTTRAIN)))


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
    assert (deit_full.epochs, deit_full.batch_size, deit_full.lr) == (3, 25, 0.0005)
    assert (deit.warmup_epochs, deit_full.warmup_epochs) == (29, 1)     # a set's warm-up, and the full data's
    # An override never leaks into the shared recipe or another student.
    assert pt.recipe.augment.min_scale == 0.25 and pt.recipe_for("mobilenetv2").augment.flip


def test_equal_steps_ipc_scales_epochs_by_steps_per_epoch(tmp_path):
    """Under equal_steps_ipc a cell at any IPC trains the optimiser steps of a cell at that IPC:
    epochs x ceil(ref images / batch) / ceil(images / batch), rounded up; full data is untouched."""
    path = tiny_task_file(tmp_path / "t.toml", {"posttrain": POSTTRAIN, "posttrain.equal_steps_ipc": 10})
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
    deit = pt.recipe_for("deit_tiny", images=50, classes=50)
    assert (deit.epochs, deit.warmup_epochs) == (30 * 5, 29 * 5)   # the warm-up too: the same schedule in steps
    assert pt.recipe_for("deit_tiny", full=True).warmup_epochs == 1
    assert pt.recipe_for("resnet18", full=True, images=1293, classes=10).epochs == 3
    assert load_task(str(tmp_path / "t.toml")).posttrain.recipe_for("resnet18").epochs == 30  # no set size: as written
    digits = load_task("digits").posttrain
    assert digits.recipe_for("resnet18", images=10, classes=10).epochs == 4 * digits.recipe_for("resnet18").epochs


def test_equal_steps_ipc_must_be_positive(tmp_path):
    path = tiny_task_file(tmp_path / "t.toml", {"posttrain": POSTTRAIN, "posttrain.equal_steps_ipc": 0})
    with pytest.raises((ConfigError, ValueError), match="equal_steps_ipc must be a positive IPC"):
        load_task(str(path))


def test_unknown_student_setting_is_refused(tmp_path):
    path = tiny_task_file(tmp_path / "t.toml", {"posttrain": POSTTRAIN,
                                                "posttrain.students.mobilenetv2": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"posttrain\.students\.mobilenetv2: unknown key\(s\) learning_rate; known keys: .*lr"):
        load_task(str(path))


def test_the_embedded_default_sets_every_panel_student():
    """Every student of the cross-arch panel has its own held-out-tuned settings on digits."""
    pt = load_task("digits").posttrain
    assert {"resnet50", "mobilenetv2", "deit_tiny"} <= set(pt.students)
    assert pt.recipe_for("deit_tiny").patch_size == 4


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
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "two methods are named 'cda': cdabench/config.py (CDA) and " in done.stderr
    assert "builtin/baselines/cda.toml; rename one" in done.stderr


def test_papers_tasks_default_to_fp32():
    for name in ("tiny-imagenet", "imagenet-1k", "imagenet-21k", "cifar100"):
        assert load_task(name).precision == "fp32"


# -------------------------------------------------------------- the task
def test_digits_task_shrinks_and_resolves_methods():
    task = load_task("digits")
    small = dataclasses.replace(
        task, teacher=dataclasses.replace(task.teacher, epochs=3),
        recover={k: dataclasses.replace(v, iterations=5) for k, v in task.recover.items()},
        posttrain=dataclasses.replace(task.posttrain, recipe=dataclasses.replace(task.posttrain.recipe, epochs=2)))
    # A student's own setting beats the shared recipe's; a student without one takes the shared
    # (shrunk) recipe's. The packaged task names its per-student epochs (docs/digits.md).
    overridden = {s: o.epochs for s, o in task.posttrain.students.items() if o.epochs is not None}
    assert overridden, "the digits task no longer gives any student its own epochs: pick another override"
    for student in (*overridden, "test_resnet"):     # test_resnet: a timm model no table names
        assert small.posttrain.recipe_for(student).epochs == overridden.get(student, 2), student
        assert small.posttrain.recipe_for(student).model == student
    cda, sre2l = recover_config(small, load_method("cda")), recover_config(small, load_method("sre2l"))
    assert cda.iterations == sre2l.iterations == 5
    assert (cda.crop.kind, cda.crop.milestone) == ("cosine", 1.0)     # the papers' CDA runs
    assert (sre2l.crop.kind, sre2l.crop.min_scale) == ("fixed", 0.08)
    assert (cda.lr, cda.r_bn, cda.first_bn_multiplier) == (0.25, 0.01, 10.0)
    assert load_method("random").kind == "select" and load_method("herding").strategy == "herding"


def test_holdout_options_take_effect_from_the_command_line(capsys, tmp_path):
    make_tiny_imagenet(tmp_path / "data", per_class=3, val_per_class=1)
    task = tmp_path / "tiny8.toml"  # the shipped task's split: 10 held-out images per class
    task.write_text('dataset = "tiny-imagenet"\nimage_size = 8\nholdout_per_class = 10\n')
    common = ["distill", "--task", str(task), "--data-root", str(tmp_path / "data"), "--method", "random",
              "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "cache")]

    code, text = run_cli(capsys, [*common, "--ipc", "1", "--out", str(tmp_path / "a")])
    assert code == 2 and "has only 3 images" in text
    assert "--holdout-per-class N" in text and "--holdout-fraction F" in text

    # 2 held out of 3 leaves 1 fit image per class; round(0.5 * 3) = 2 likewise.
    for option in (["--holdout-per-class", "2"], ["--holdout-fraction", "0.5"]):
        code, text = run_cli(capsys, [*common, *option, "--ipc", "2", "--out", str(tmp_path / "b")])
        assert code == 2 and "IPC 2 is larger than class" in text and "(1 real training images" in text, option

    code, _ = run_cli(capsys, [*common, "--holdout-per-class", "1", "--ipc", "2", "--out", str(tmp_path / "c")])
    assert code == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert len(manifest["selection"]) == 200 and all(len(v) == 2 for v in manifest["selection"].values())
    # The same --out with another split is another distillation: refused, naming the split.
    code, text = run_cli(capsys, [*common, "--holdout-fraction", "0.34", "--ipc", "2", "--out", str(tmp_path / "c")])
    assert code == 2 and "differs in: split" in text

    with pytest.raises(SystemExit):  # one or the other
        run_cli(capsys, [*common, "--holdout-per-class", "1", "--holdout-fraction", "0.5", "--out", str(tmp_path / "d")])


@pytest.mark.parametrize("command", [["distill", "--out", "x"], ["evaluate", "--data", "d", "--out", "x"],
                                     ["run", "--suite", "s"], ["check", "--suite", "s"]])
def test_every_command_that_opens_a_task_takes_the_holdout_options(command):
    from cdabench.cli import build_parser

    args = build_parser().parse_args([*command, "--holdout-per-class", "3"])
    assert (args.holdout_per_class, args.holdout_fraction) == (3, None)
    args = build_parser().parse_args([*command, "--holdout-fraction", "0.25"])
    assert (args.holdout_per_class, args.holdout_fraction) == (None, 0.25)


def test_with_holdout_replaces_the_split_and_enters_the_cell_keys():
    from cdabench.config import ConfigError, load_task, split_settings, with_holdout
    from cdabench.harness.crossarch import Cell, cell_key

    task = load_task("tiny-imagenet")
    assert with_holdout(task) is task
    changed = with_holdout(task, per_class=2)
    assert (changed.holdout_per_class, changed.holdout_fraction) == (2, None)
    by_fraction = with_holdout(task, fraction=0.1)
    assert (by_fraction.holdout_per_class, by_fraction.holdout_fraction) == (None, 0.1)
    for bad in ({"per_class": 0}, {"fraction": 1.0}, {"per_class": 1, "fraction": 0.5}):
        with pytest.raises(ConfigError, match="--holdout"):
            with_holdout(task, **bad)
    cell = Cell(task.name, "full", None, "resnet18", "hard", 0)
    keys = {cell_key(cell, "same-images", {}, None, split_settings(t)) for t in (task, changed, by_fraction)}
    assert len(keys) == 3  # a full set's images hash is the data's: the split must enter the key
