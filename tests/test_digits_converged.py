"""The converged digits run's task files (benchmarks/digits-converged/): the candidate shares the
builtin digits task's data, split, teacher and recover (so its teacher and sets are the builtin
task's); `doubled.toml` is it with every post-train epoch count doubled and nothing else, and
`quadrupled.toml` with them quadrupled (the doubling of `doubled.toml`); `recover300.toml` with the
recover iterations doubled and nothing else, and `doubled-recover300.toml` the same of `doubled.toml`;
`teacher1.toml` and `teacher2.toml` with another teacher seed and nothing else."""
from __future__ import annotations

import dataclasses

import pytest

from cdabench.config import load_task
from cdabench.harness.suites import load_suite
from tests.fixtures import REPO

FOLDER = REPO / "benchmarks" / "digits-converged"


def _task(name: str):
    return load_task(str(FOLDER / f"{name}.toml"))


def _without_path(task):
    return dataclasses.replace(task, path="", description="")


def test_the_candidate_shares_the_builtin_tasks_teacher_split_and_recover():
    base, builtin = _task("base"), load_task("digits")
    assert base.name == builtin.name == "digits"
    for f in ("dataset", "image_size", "ipcs", "holdout_fraction", "holdout_per_class", "split_seed", "teacher",
              "teacher_seed", "recover", "precision"):
        assert getattr(base, f) == getattr(builtin, f), f
    assert base.panel == ("resnet18_w16", "resnet50_w16", "mobilenetv2_035", "deit_w64")


@pytest.mark.parametrize("name, factor", [("doubled", 2), ("quadrupled", 4)])
def test_a_longer_variant_multiplies_every_posttrain_epoch_count_and_nothing_else(name, factor):
    base, longer = _task("base"), _task(name)
    pb, pl = base.posttrain, longer.posttrain
    assert pl.recipe.epochs == factor * pb.recipe.epochs and pl.full_epochs == factor * pb.full_epochs
    assert pl.students.keys() == pb.students.keys()
    for student, override in pb.students.items():
        for field in ("epochs", "full_epochs"):
            value = getattr(override, field)
            assert getattr(pl.students[student], field) == (None if value is None else factor * value), \
                (student, field)
        assert dataclasses.replace(pl.students[student], epochs=None, full_epochs=None) == \
            dataclasses.replace(override, epochs=None, full_epochs=None), student
    for student in base.panel:                       # every student's resolved recipe, at IPC 10, 1 and on full
        for kwargs in ({"images": 100, "classes": 10}, {"images": 10, "classes": 10}, {"full": True}):
            rb, rl = pb.recipe_for(student, **kwargs), pl.recipe_for(student, **kwargs)
            assert rl.epochs == factor * rb.epochs and dataclasses.replace(rl, epochs=rb.epochs) == rb, \
                (student, kwargs)
    assert _without_path(dataclasses.replace(longer, posttrain=pb)) == _without_path(base)


@pytest.mark.parametrize("name, of", [("recover300", "base"), ("doubled-recover300", "doubled")])
@pytest.mark.parametrize("method", ["cda", "sre2l"])
def test_a_recover_doubling_doubles_the_recover_iterations_and_nothing_else(name, of, method):
    task, doubling = _task(of), _task(name)
    rb, rr = task.recover[method], doubling.recover[method]
    assert (rb.iterations, rr.iterations) == (150, 300)
    assert _without_path(dataclasses.replace(doubling, recover=task.recover)) == _without_path(task)


@pytest.mark.parametrize("seed", [1, 2])
def test_another_teacher_seed_and_nothing_else(seed):
    base, other = _task("base"), _task(f"teacher{seed}")
    assert (base.teacher_seed, other.teacher_seed) == (0, seed)
    assert _without_path(dataclasses.replace(other, teacher_seed=0)) == _without_path(base)


def test_the_soft_slice_is_the_cross_arch_grid_without_the_opt_in_cells():
    soft, full = load_suite(str(FOLDER / "soft.toml")), load_suite("cross-arch")
    assert (soft.methods, soft.labels, soft.seeds, soft.task) == (full.methods, full.labels, full.seeds, full.task)
    assert soft.hard_label_methods == () and soft.no_augment_methods == ()
