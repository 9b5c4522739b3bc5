"""Regression checks: targets are k standard deviations of (a check's mean - the target), over seeds
and float paths, two-sided where
asked, on any record field; `cdabench check` fails on a degraded record and a missing cell."""
from __future__ import annotations

import math

import pytest

from cdabench import records
from cdabench.cli import main
from cdabench.results.check import compare, read_targets, write_targets
from tests.fixtures import grid_records, make_record, write_records


def test_check_fails_on_a_degraded_record_and_a_missing_cell(tmp_path, capsys):
    good = write_records(tmp_path / "good", grid_records())
    targets = tmp_path / "targets.csv"
    write_targets(targets, records.read_records(good / "records.jsonl"))
    assert len(read_targets(targets)) == 4 * 4 + 4
    assert main(["check", "--suite", "cross-arch", "--targets", str(targets), "--records", str(good)]) == 0
    assert "20 passed, 0 failed" in capsys.readouterr().out
    degraded = write_records(tmp_path / "bad", grid_records(shift={"cda": -10.0}))
    assert main(["check", "--suite", "cross-arch", "--targets", str(targets), "--records", str(degraded)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED digits cda ipc10 resnet18 soft" in out and "4 failed" in out
    better = write_records(tmp_path / "better", grid_records(shift={"cda": +10.0}))   # one-sided: better passes
    assert main(["check", "--suite", "cross-arch", "--targets", str(targets), "--records", str(better)]) == 0
    capsys.readouterr()
    partial = write_records(tmp_path / "partial", [r for r in grid_records() if r["method"] != "herding"])
    assert main(["check", "--suite", "cross-arch", "--targets", str(targets), "--records", str(partial)]) == 1
    assert "MISSING   digits herding" in capsys.readouterr().out


def test_targets_are_k_standard_errors_and_two_sided_targets_catch_a_move_up(tmp_path):
    # Two seeds per cell: cda 80 / 82 (s = 1.414), random 85 / 86 (s = 0.707).
    rows = [make_record("cda", 10, "resnet18", seed, 80.0 + 2 * seed) for seed in (0, 1)]
    rows += [make_record("random", 10, "resnet18", seed, 85.0 + seed) for seed in (0, 1)]
    targets = write_targets(tmp_path / "t.csv", rows, two_sided=("cda",))
    by_method = {t.method: t for t in targets}
    assert by_method["cda"].target_top1 == 81.0 and by_method["cda"].sides == 2
    # one path: d^2 = s^2 / n x (1 + 1/1); cda: 2 / 2 x 2 = 2, tolerance 3 x 1.414 = 4.24
    assert by_method["cda"].tolerance == round(3 * math.sqrt(2), 2) == 4.24
    assert by_method["random"].tolerance == 2.12 and by_method["random"].sides == 1    # 3 x sqrt(0.5 / 2 x 2)
    assert read_targets(tmp_path / "t.csv") == targets                               # the CSV round-trips
    up = [make_record("cda", 10, "resnet18", seed, 90.0) for seed in (0, 1)]
    up += [make_record("random", 10, "resnet18", seed, 95.0) for seed in (0, 1)]
    status = {s.target.method: s.status for s in compare(up, targets)}
    assert status == {"cda": "changed", "random": "ok"}      # better fails only where both sides are checked
    down = [make_record("cda", 10, "resnet18", seed, 76.7) for seed in (0, 1)]           # below 81 - 4.24
    assert [s.status for s in compare(down, targets) if s.target.method == "cda"] == ["regressed"]


def test_a_target_looser_than_five_points_is_refused(tmp_path):
    rows = [make_record("sre2l", 10, "resnet18", seed, 60.0 + 8 * seed) for seed in (0, 1)]   # 3 x sqrt(32 / 2 x 2)
    with pytest.raises(ValueError, match=r"too unstable for a regression target \(tolerance > 5 points\): "
                                         r"sre2l ipc10 resnet18 soft \(tolerance 16.97\)"):
        write_targets(tmp_path / "t.csv", rows)
    assert not (tmp_path / "t.csv").exists()


def test_a_target_on_another_record_field_catches_a_changed_distilled_set(tmp_path):
    """label_agreement (the teacher's agreement with a distilled set's labels) is a property of the
    set itself: CDA's crop-trained images score 88-97 % on digits, images recovered without crops 100 %."""
    rows = []
    for seed, agreement in enumerate((93.0, 96.0, 95.0, 96.0)):
        rows.append(make_record("cda", 10, "resnet18", seed, 70.0 + seed) | {"label_agreement": agreement})
    targets = write_targets(tmp_path / "t.csv", rows, two_sided=("cda",), metrics=("top1", "label_agreement"))
    agreement = next(t for t in targets if t.metric == "label_agreement")
    # mean 95; s^2 = (4 + 1 + 0 + 1) / 3 = 2; 3 x sqrt(2 / 4 x 2) = 3.00
    assert (agreement.target_top1, agreement.tolerance, agreement.sides) == (95.0, 3.0, 2)
    assert read_targets(tmp_path / "t.csv") == targets
    no_crop = [make_record("cda", 10, "resnet18", seed, 70.0 + seed) | {"label_agreement": 100.0} for seed in range(4)]
    status = {s.target.metric: s.status for s in compare(no_crop, targets)}
    assert status == {"top1": "ok", "label_agreement": "changed"}
    unrecorded = compare([r | {"label_agreement": None} for r in no_crop], targets)
    assert [s.status for s in unrecorded if s.target.metric == "label_agreement"] == ["missing"]


def test_targets_over_float_paths_add_what_a_path_moves_beyond_its_seeds(tmp_path):
    """Records from several float paths (`path_of`): within-path seed variance pooled, the paths'
    extra spread added, and the target's own error (1 + 1/P), by hand."""
    def rows(method, by_path):
        return [make_record(method, 10, "resnet18", seed, v) | {"path": p}
                for p, values in by_path.items() for seed, v in enumerate(values)]
    # Paths agree beyond their seeds: means 71, 72 (var 0.5 < s_w^2 / n = 1), so s_b = 0;
    # d^2 = (2 / 2 + 0) x (1 + 1/2) = 1.5: tolerance 3 x 1.2247 = 3.67 around 71.5.
    quiet = rows("cda", {"avx512": [70.0, 72.0], "avx2": [71.0, 73.0]})
    # Paths disagree: means 71, 77 (var 18); s_b^2 = 18 - 1 = 17; d^2 = (1 + 17) x 1.5 = 27: 15.59.
    loud = rows("sre2l", {"avx512": [70.0, 72.0], "avx2": [76.0, 78.0]})
    targets = write_targets(tmp_path / "t.csv", quiet + loud, max_tolerance=20.0, path_of=lambda r: r["path"])
    by_method = {t.method: (t.target_top1, t.tolerance) for t in targets}
    assert by_method == {"cda": (71.5, 3.67), "sre2l": (74.0, 15.59)}
    # Pooled as one path, the same sre2l records would have looked steadier than they are.
    one_path = {t.method: t.tolerance for t in write_targets(tmp_path / "u.csv", loud, max_tolerance=20.0)}
    assert one_path["sre2l"] < 15.59
