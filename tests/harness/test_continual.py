"""The continual suite: seeded and recorded scenarios that leave global RNG state alone, the
masking fix of the retrain protocol, equal memory across sources, metrics against a hand
computation (and Avalanche's functional forgetting), every strategy end to end on CPU, Tiny-ImageNet
offline, clear errors on bad input, and `cdabench run --suite continual` with resume and leaderboard."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdabench import records
from cdabench.cli import main
from cdabench.config import ConfigError, load_task
from cdabench.evaluate.continual import metrics
from cdabench.evaluate.continual import avalanche_env
from cdabench.evaluate.continual.memory import first_per_class, load_memory
from cdabench.evaluate.continual.retrain import kd_source, run_retrain
from cdabench.evaluate.continual.scenario import build_scenario, class_order, scenario_for, split_steps
from cdabench.evaluate.continual.sequential import SequentialSettings, run_sequential
from cdabench.harness.continual import expand, strategies, validate
from cdabench.harness.run import run_suite
from cdabench.harness.suites import load_suite
from cdabench.results import continual as report
from cdabench.evaluate.continual.strategies import (check_strategy, create_strategy, list_strategies, memory_kind,
                                           register_strategy)
from cdabench.data import DataError
from cdabench.engine.context import open_context
from cdabench.engine.labels import HardLabels
from cdabench.engine.models import create_model
from cdabench.engine.train import ImageBank, evaluate_model, train_model
from cdabench.results.leaderboard import generate
from cdabench.results.published import read_continual
from cdabench.schema import AugmentSpec, ContinualSuite, TrainRecipe
from tests.fixtures import make_tiny_imagenet
from tests.interrupt import interrupt_at

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
STUDENT = "test_resnet"   # timm's 0.37 M-parameter ResNet: ~10x cheaper per step than ResNet-18 at 8 px

TINY_TASK = """
dataset = "digits"
ipcs = [3]
holdout_fraction = 0.1
[teacher]
model = "test_resnet"
epochs = 3
batch_size = 64
lr = 0.05
warmup_epochs = 1
augment = { crop = "none", flip = false }
[recover.cda]
iterations = 3
batch_size = 30
jitter = 1
[recover.sre2l]
iterations = 3
batch_size = 30
jitter = 1
[posttrain.recipe]
epochs = 2
batch_size = 20
optimizer = "adamw"
lr = 0.003
[posttrain.kd]
temperature = 4.0
"""

TINY_SUITE = """
kind = "continual"
task = "{task}"
steps = [5]
memories = ["random", "herding", "cda", "sre2l"]
unmasked = ["cda"]
strategies = ["naive", "replay", "gdumb", "lwf", "ewc", "der", "er_ace"]
student = "test_resnet"
retrain_epochs = 3
[sequential]
epochs = 1
lr = 0.003
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return open_context(load_task("digits"), None, "cpu", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def small(digits):
    """Digits, 20 training images per class (the stream), the full test split, 5 x 2 classes."""
    fit = digits.source("fit")
    idx = np.concatenate([np.flatnonzero(fit.labels.numpy() == c)[:20] for c in range(10)])
    train = ImageBank(fit.images[idx], fit.labels[idx])
    return build_scenario(train, digits.source("test"), 10, 5, 0, digits.mean, digits.std, digits.classes)


def global_rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(before):
    after = global_rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


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


# ------------------------------------------------------------------- metrics
def test_forgetting_and_bwt_equal_a_hand_computation():
    a = [[90.0, 0.0, 0.0, 0.0],
         [70.0, 80.0, 5.0, 0.0],
         [75.0, 60.0, 85.0, 0.0],
         [50.0, 65.0, 40.0, 95.0]]
    # forgetting: best before the last step minus final, for experiences 0..2
    assert metrics.forgetting_per_experience(a) == [90 - 50, 80 - 65, 85 - 40]
    assert metrics.average_forgetting(a) == pytest.approx((40 + 15 + 45) / 3)
    # BWT: final minus just-learned
    assert metrics.backward_transfer(a) == pytest.approx(((50 - 90) + (65 - 80) + (40 - 85)) / 3)
    assert metrics.seen_accuracy(a) == pytest.approx([90, 75, 220 / 3, 62.5])
    assert metrics.seen_accuracy(a, weights=[1, 3, 1, 1])[1] == pytest.approx((70 + 240) / 4)
    assert metrics.final_accuracy(a) == pytest.approx(62.5)
    assert metrics.unseen_accuracy(a) == pytest.approx(5.0 / 6)
    summary = metrics.summarise(a)
    assert summary.final_accuracy == pytest.approx(62.5) and summary.bwt == metrics.backward_transfer(a)
    assert metrics.average_forgetting([[88.0]]) == 0.0 and metrics.backward_transfer([[88.0]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        metrics.seen_accuracy([[1.0, 2.0]])
    # Avalanche's functional forgetting is A[k][k] - A[t][k]: its last row averages to -BWT.
    from avalanche.evaluation.functional import forgetting
    assert float(np.mean(forgetting(np.array(a))[-1, :-1])) == pytest.approx(-metrics.backward_transfer(a))


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


def test_memory_larger_than_the_data_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    suite = ContinualSuite(name="x", memories=("random",), ipc=1000, strategies=("naive",))
    with pytest.raises(DataError, match="IPC 1000 is larger than class"):
        run_suite(suite, tmp_path / "run", device="cpu")
    assert not (tmp_path / "cache" / "teachers").exists()       # refused before any training
    with pytest.raises(DataError, match="fewer than the memory's 4 per class"):
        first_per_class(np.array([0, 0, 0, 1, 1, 1, 1]), 4, 2, "folder x")
    assert main(["run", "--suite", "continual", "--steps", "3", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "--steps 3 does not divide the 10 classes" in capsys.readouterr().err
    assert main(["run", "--suite", "continual", "--strategies", "icarl", "--quiet"]) == 2
    assert "excluded" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", "--steps", "5", "--quiet"]) == 2
    assert "continual suites only" in capsys.readouterr().err


def test_the_shipped_suite_loads_and_expands():
    suite = load_suite("continual")
    validate(suite)
    cells = expand(suite)
    assert {c.protocol for c in cells} == {"retrain", "sequential"}
    assert any(c.protocol == "retrain" and c.masked is False for c in cells)
    assert all(c.ipc == load_task(suite.task).ipcs[0] for c in cells)


def test_a_suite_file_by_path_loads_its_sequential_table_and_names_a_wrong_key(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(TINY_SUITE.format(task="digits"))
    suite = load_suite(str(path))
    assert suite.name == "mine" and suite.path == str(path)
    assert suite.sequential == SequentialSettings(epochs=1, lr=0.003)
    path.write_text(TINY_SUITE.format(task="digits") + "epoch = 2\n")
    with pytest.raises(ConfigError, match=r"mine.toml.sequential: unknown key\(s\) epoch; known keys: .*epochs"):
        load_suite(str(path))


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


@pytest.mark.slow
def test_importing_avalanche_writes_nothing_to_home(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    code = ("import os, warnings; from cdabench.evaluate.continual import avalanche_env; "
            f"avalanche_env.load({str(cache)!r}); "
            "assert os.environ['HOME'] == " + repr(str(home)) + "; "
            "assert not any('QP solver' in str(f) for f in warnings.filters)")
    env = dict(os.environ, HOME=str(home), OMP_NUM_THREADS="1", PYTHONWARNINGS="error::UserWarning")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "QP solver" not in done.stderr and done.stdout == ""
    assert list(home.iterdir()) == []
    assert (cache / "avalanche-home" / ".avalanche" / "config.json").is_file()


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_continual_suite_end_to_end_resumes_and_feeds_the_leaderboard(tmp_path, monkeypatch):
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.toml").write_text(TINY_TASK)
    suite_path = tmp_path / "tiny-continual.toml"
    suite_path.write_text(TINY_SUITE.format(task=tmp_path / "tiny.toml"))
    out = tmp_path / "run"
    # Killed once two cells are recorded, then resumed by the command line.
    suite = load_suite(str(suite_path))
    with pytest.raises(KeyboardInterrupt), interrupt_at(f"suite {suite.name}", 2):
        run_suite(suite, out, device="cpu")
    assert len(records.read_records(out / "records.jsonl")) == 2
    assert main(["run", "--suite", str(suite_path), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    rows = records.read_records(out / "records.jsonl")
    assert len(rows) == 5 + 10          # retrain 4 memories + 1 unmasked; naive, 4 replays, 3 own buffers, lwf, ewc
    assert len({r["cell_key"] for r in rows}) == len(rows)
    assert main(["run", "--suite", str(suite_path), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert len(records.read_records(out / "records.jsonl")) == 15       # nothing ran again

    for r in rows:
        assert r["kind"] == "continual" and r["steps"] == 5 and len(r["class_order"]) == 10
        assert len(r["accuracy_matrix"]) == 5 and len(r["seen_accuracy"]) == 5
        assert r["top1"] == r["final_accuracy"] == r["seen_accuracy"][-1]
        assert {"forgetting", "bwt", "masked", "protocol", "strategy", "memory", "student"} <= set(r)
        assert not any("Top1_Acc" in key or "/" in key for key in r)          # no Avalanche metric names
    retrain = {(r["memory"], r["masked"]): r for r in rows if r["protocol"] == "retrain"}
    assert set(retrain) == {("random", True), ("herding", True), ("cda", True), ("sre2l", True), ("cda", False)}
    assert retrain[("cda", True)]["label_protocol"] == "online-kd-masked"
    assert retrain[("cda", False)]["label_protocol"] == "online-kd-unmasked"
    sequential = {(r["strategy"], r["memory"]) for r in rows if r["protocol"] == "sequential"}
    assert {s for s, _ in sequential} == set(list_strategies())
    # Equal memory: every source holds ipc images of every class; bytes are recorded per source.
    with_memory = [r for r in rows if r["memory"] in ("random", "herding", "cda", "sre2l")]
    assert {r["num_images"] for r in with_memory} == {3 * 10}
    assert all(r["image_bytes"] > 0 for r in with_memory)
    task_ctx = open_context(load_task(str(tmp_path / "tiny.toml")), None, "cpu", tmp_path / "cache")
    folders = sorted((out / "distilled").iterdir())
    assert len(folders) == 4
    for folder in folders:
        assert load_memory(task_ctx, folder, 3).per_class(10) == [3] * 10
    with pytest.raises(DataError, match="fewer than the memory's 4 per class"):
        load_memory(task_ctx, folders[0], 4)
    tampered = sorted((folders[0] / "images").rglob("*.png"))[0]
    tampered.write_bytes(sorted((folders[0] / "images").rglob("*.png"))[-1].read_bytes())
    with pytest.raises(DataError, match="changed since it was distilled"):
        load_memory(task_ctx, folders[0], 3)

    written = generate([out], tmp_path / "lb")
    names = {p.name for p in written}
    assert "tiny-continual-5steps-ipc3-test_resnet-curves.png" in names
    assert "tiny-continual-5steps-ipc3-test_resnet-matrices.png" in names
    md = (tmp_path / "lb" / "tiny.md").read_text()
    assert "## Continual learning (class-incremental)" in md and "replay · cda" in md
    assert (tmp_path / "lb" / "tiny-continual-5steps-ipc3-test_resnet-curves.png").read_bytes()[:4] == b"\x89PNG"
    generate([out], tmp_path / "lb2")
    assert (tmp_path / "lb2" / "tiny.md").read_bytes() == md.encode()      # byte-deterministic


def test_published_continual_numbers_are_shown_with_a_status():
    published = read_continual()
    assert [p["top1"] for p in published] == [45.6, 48.5, 49.4, 49.8, 49.9]
    lines = "\n".join(report.markdown_section([], published))
    assert lines.count("| not run |") == 5 and "| 5 | 200 | 49.9 |" in lines
    record = {"continual": True, "dataset": "tiny-imagenet", "steps": 5, "ipc": 100, "memory": "sre2l",
              "protocol": "retrain", "student": "resnet18", "masked": False, "seed": 0,
              "seen_accuracy": [45.0, 48.0, 49.0, 49.5, 49.6]}
    rows = report.published_rows([record], published)
    assert rows[0][3] == "45.0" and rows[0][4] == "reproduced" and rows[0][5] == "–"
    assert json.dumps(rows)   # plain strings only
