"""The cross-arch suite kind: its grid expands as declared; unknown names are refused with the valid ones."""
from __future__ import annotations

import pytest

from cdabench.cli import main
from cdabench.config import ConfigError, list_methods, list_tasks
from cdabench.engine.models import list_models
from cdabench.harness.crossarch import Cell, expand, narrow, validate
from cdabench.harness.suites import load_suite


def test_cross_arch_grid_expands_as_declared():
    suite = load_suite("cross-arch")
    cells = expand(suite)
    # Per student and seed: 4 methods x 2 IPCs (1, 10) soft, + hard and augmentation-off for cda and random
    # at each IPC, + full (no IPC) soft and hard; x 3 seeds x 4 students.
    assert len(cells) == ((4 + 2 + 2) * 2 + 2) * 3 * 4
    assert Cell("digits", "full", None, "deit_tiny", "hard", 2) in cells
    assert Cell("digits", "random", 1, "mobilenetv2", "soft", 2, augment=False) in cells
    assert Cell("digits", "random", 1, "resnet18", "hard", 0) in cells
    assert len(set(cells)) == len(cells)
    assert Cell("digits", "cda", 10, "deit_tiny", "hard", 1) in cells
    assert Cell("digits", "full", None, "resnet50", "soft", 0) in cells
    assert not any(c.method == "sre2l" and c.labels == "hard" for c in cells)
    narrowed = expand(narrow(suite, students=["resnet18"], seeds=[0, 1, 2], methods=["cda", "random"]))
    assert len(narrowed) == 2 * 2 * 3 * 3   # methods x IPCs x seeds x (soft, hard, soft with augmentation off)
    assert len(expand(narrow(suite, ipcs=[10]))) == (5 + 3 + 2) * 3 * 4


@pytest.mark.parametrize("change, message, valid", [
    ({"methods": ["cda", "magic"]}, "unknown method 'magic'", list_methods),
    ({"students": ["resnet18", "not_a_net"]}, "unknown student(s) not_a_net", list_models),
    ({"task": "no-such-task"}, "unknown task 'no-such-task'", list_tasks),
])
def test_unknown_names_are_refused_with_the_valid_ones(change, message, valid):
    """The error names the unknown value and lists every valid one (the registry's own list)."""
    suite = narrow(load_suite("cross-arch"), **change)
    with pytest.raises(ConfigError) as err:
        validate(suite)
    text = str(err.value)
    assert message in text, text
    assert ", ".join(sorted(valid())) in text, text


def test_unknown_suite_lists_suites(capsys):
    assert main(["run", "--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err and "cross-arch" in err


def test_the_cells_of_the_image_scores_are_opt_in_and_keep_the_old_keys():
    """`full` among the hard-label methods adds the full-data hard cells (the hard-label recovery);
    `no_augment_methods` adds each listed method's cells with the student's augmentation off (the
    augmentation share). A cell with the augmentation on keeps its key."""
    import dataclasses

    from cdabench import artifacts
    from cdabench.config import load_task
    from cdabench.harness.crossarch import cell_key

    suite = load_suite("cross-arch")                  # the packaged suite opts in to both
    assert "full" in suite.hard_label_methods and set(suite.no_augment_methods) == {"cda", "random"}
    base = dataclasses.replace(suite, hard_label_methods=tuple(m for m in suite.hard_label_methods if m != "full"),
                               no_augment_methods=())
    before, cells = expand(base), expand(suite)
    extra = [c for c in cells if c not in before]
    task = load_task(base.task)
    per_set = len(base.students or task.panel) * len(base.seeds)
    assert len(extra) == per_set + 2 * len(base.ipcs or task.ipcs) * per_set
    assert [c for c in extra if c.method == "full"] == [c for c in extra if c.labels == "hard"]
    assert all(not c.augment and c.labels == "soft" for c in extra if c.method != "full")
    assert Cell("digits", "cda", 10, "resnet18", "soft", 0, augment=False).name == "cda/ipc10/resnet18/soft/noaug/seed0"
    on = Cell("digits", "cda", 10, "resnet18", "soft", 0)
    old = {"task": "digits", "method": "cda", "ipc": 10, "student": "resnet18", "labels": "soft", "seed": 0}
    assert cell_key(on, "i", {"e": 1}, "t", {"s": 1}) == artifacts.hash_config(
        {"cell": old, "images": "i", "split": {"s": 1}, "eval": {"e": 1}, "teacher": "t"})
    assert cell_key(dataclasses.replace(on, augment=False), "i", {"e": 1}, "t", {"s": 1}) != \
        cell_key(on, "i", {"e": 1}, "t", {"s": 1})
    with pytest.raises(ConfigError, match="no_augment_methods = \\['cda'\\] needs random too"):
        validate(dataclasses.replace(base, no_augment_methods=("cda",)))
