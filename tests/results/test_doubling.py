"""The doubling test (cdabench/results/doubling.py, `cdabench doubling`): per row the students'
means and the panel mean over the cells both runs hold, against a hand computation; flags and the
exit code at the limits; rows and cells only one run holds are left out, not counted as zero."""
from __future__ import annotations

import pytest

from cdabench.results.doubling import doubling, markdown, worst
from tests.fixtures import make_record, run_cli, write_records


def _held(record: dict, heldout: float) -> dict:
    return dict(record, heldout_top1=heldout)


def _runs():
    # Base: cda IPC 10 on two students, seeds 0-1; the doubled run moves resnet18 by +1 and +3,
    # mobilenetv2 by +6 and +8 (mean +7: over the student limit), and holds one more seed and a
    # random row that the base run lacks.
    base = [_held(make_record("cda", 10, "resnet18", 0, 50.0), 90.0), _held(make_record("cda", 10, "resnet18", 1, 50.0), 92.0),
            _held(make_record("cda", 10, "mobilenetv2", 0, 50.0), 80.0), _held(make_record("cda", 10, "mobilenetv2", 1, 50.0), 70.0)]
    doubled = [_held(make_record("cda", 10, "resnet18", 0, 60.0), 91.0), _held(make_record("cda", 10, "resnet18", 1, 60.0), 95.0),
               _held(make_record("cda", 10, "mobilenetv2", 0, 60.0), 86.0), _held(make_record("cda", 10, "mobilenetv2", 1, 60.0), 78.0),
               _held(make_record("cda", 10, "resnet18", 2, 60.0), 10.0), _held(make_record("random", 10, "resnet18", 0, 60.0), 99.0)]
    return base, doubled


def test_means_over_the_cells_both_runs_hold():
    base, doubled = _runs()
    [row] = doubling(base, doubled)                       # random: only in the doubled run
    assert (row.ipc, row.method, row.labels, row.augment) == (10, "cda", "soft", "on")
    r18, mb = row.students["resnet18"], row.students["mobilenetv2"]
    assert (r18.base, r18.doubled, r18.n) == (91.0, 93.0, 2)   # seed 2 (10.0) is in one run only
    assert (mb.base, mb.doubled, mb.delta) == (75.0, 82.0, 7.0)
    assert (row.panel.base, row.panel.doubled, row.panel.n) == (83.0, 87.5, 4)
    assert worst([row]) == (4.5, 7.0)
    # The test split instead of the held-out one: every top1 moved by +10.
    [test_row] = doubling(base, doubled, metric="top1")
    assert test_row.panel.delta == 10.0


def test_markdown_flags_what_exceeds_the_limits():
    base, doubled = _runs()
    lines = markdown(doubling(base, doubled))
    assert lines[0] == "| task | IPC | method | resnet18 | mobilenetv2 | panel mean | cells |"
    assert lines[2] == ("| digits | 10 | cda | 91.0 → 93.0 (+2.0) | 75.0 → 82.0 (+7.0) ✗ | 83.0 → 87.5 (+4.5) ✗ | 4 |")
    assert lines[-1].endswith("not converged.")
    assert markdown(doubling(base, doubled), panel_limit=5, student_limit=7)[-1].endswith(": converged.")


def test_no_augment_and_hard_rows_stay_apart():
    on, off = make_record("cda", 10, "resnet18", 0, 50.0), dict(make_record("cda", 10, "resnet18", 0, 40.0), augmentation="off")
    hard = make_record("cda", 10, "resnet18", 0, 30.0, labels="hard")
    rows = doubling([on, off, hard], [dict(on, heldout_top1=51.0), dict(off, heldout_top1=42.0), dict(hard, heldout_top1=33.0)])
    assert [(r.label, r.panel.delta) for r in rows] == [("cda", 1.0), ("cda (no aug)", 2.0), ("cda (hard)", 3.0)]
    full, ipc1 = make_record("full", None, "resnet18", 0, 90.0), make_record("cda", 1, "resnet18", 0, 20.0)
    rows = doubling([full, ipc1, on], [full, ipc1, on])
    assert [r.ipc for r in rows] == [10, 1, None]         # the largest IPC first, the full data last


def test_cli_exit_code_follows_the_limits(tmp_path, capsys):
    base, doubled = _runs()
    write_records(tmp_path / "base", base)
    write_records(tmp_path / "doubled", doubled)
    argv = ["doubling", "--base", str(tmp_path / "base"), "--doubled", str(tmp_path / "doubled")]
    code, text = run_cli(capsys, argv)
    assert code == 1 and "75.0 → 82.0 (+7.0) ✗" in text and "not converged" in text
    code, text = run_cli(capsys, argv + ["--panel-limit", "5", "--student-limit", "7"])
    assert code == 0 and ": converged." in text
    write_records(tmp_path / "other", [make_record("sre2l", 1, "resnet18", 0, 50.0)])
    code, text = run_cli(capsys, ["doubling", "--base", str(tmp_path / "base"), "--doubled", str(tmp_path / "other")])
    assert code == 2 and "share no cell" in text


def test_a_record_without_the_metric_is_refused_by_name():
    record = make_record("cda", 10, "resnet18", 0, 50.0)
    del record["heldout_top1"]
    with pytest.raises(ValueError, match="has no 'heldout_top1'"):
        doubling([record], [record])
