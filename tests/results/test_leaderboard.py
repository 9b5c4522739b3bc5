"""Suites expand as declared; leaderboards are byte-deterministic; `cdabench check` fails on a
regression; bad names and foreign record schemas are refused with the reason."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cdabench import records
from cdabench.cli import main
from cdabench.config import ConfigError
from cdabench.harness.crossarch import Cell, expand, narrow, validate
from cdabench.harness.suites import load_suite
from cdabench.results.check import compare, read_targets, write_targets
from cdabench.results.leaderboard import generate
from cdabench.results.published import status as published_status
from cdabench.results.report import summarise, verdict

STUDENTS = ("resnet18", "resnet50", "mobilenetv2", "deit_tiny")


def test_cross_arch_grid_expands_as_declared():
    suite = load_suite("cross-arch")
    cells = expand(suite)
    # 4 methods x 2 IPCs (1, 10) + full (no IPC), x 2 seeds x 4 students, soft; + hard for cda and random.
    assert len(cells) == ((4 + 2) * 2 + 1) * 2 * 4
    assert Cell("digits", "random", 1, "resnet18", "hard", 0) in cells
    assert len(set(cells)) == len(cells)
    assert Cell("digits", "cda", 10, "deit_tiny", "hard", 1) in cells
    assert Cell("digits", "full", None, "resnet50", "soft", 0) in cells
    assert not any(c.method == "sre2l" and c.labels == "hard" for c in cells)
    narrowed = expand(narrow(suite, students=["resnet18"], seeds=[0, 1, 2], methods=["cda", "random"]))
    assert len(narrowed) == 2 * 2 * 3 * 2   # methods x IPCs x seeds x (soft, hard)
    assert len(expand(narrow(suite, ipcs=[10]))) == (5 + 2) * 2 * 4


@pytest.mark.parametrize("change, message", [
    ({"methods": ["cda", "magic"]}, "unknown method 'magic'"),
    ({"students": ["resnet18", "not_a_net"]}, "unknown student(s) not_a_net"),
    ({"task": "no-such-task"}, "unknown task 'no-such-task'"),
])
def test_unknown_names_are_refused_with_the_valid_ones(change, message):
    suite = narrow(load_suite("cross-arch"), **change)
    with pytest.raises(ConfigError) as err:
        validate(suite)
    assert message in str(err.value) and "known" in str(err.value) or "use" in str(err.value)


def test_unknown_suite_lists_suites(capsys):
    assert main(["run", "--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err and "cross-arch" in err


def make_record(method: str, ipc, student: str, seed: int, top1: float, labels: str = "soft", task: str = "digits") -> dict:
    record = {
        "schema_version": records.SCHEMA_VERSION, "task": task, "dataset": task, "method": method, "ipc": ipc,
        "student": student, "labels": labels, "label_protocol": "online-kd" if labels == "soft" else "hard",
        "seed": seed, "top1": top1, "top5": min(100.0, top1 + 5), "heldout_top1": top1, "epochs": 10,
        "num_images": 100, "image_bytes": 8000, "label_bytes": 0, "teacher_forwards": 1000,
        "seconds": {"recover": 1.0, "posttrain": 2.0}, "device": "cpu:test", "command": "cdabench run --suite t",
        "versions": {"cdabench": "0.1.0", "torch": "2.14.1", "timm": "1.0.31"},
        "hashes": {"images": "x", "labels": None, "teacher": "t", "eval_config": "e", "classes": "c"},
    }
    record["record_hash"] = records.record_id(record)
    return record


def write_records(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return folder


def grid_records(shift: dict | None = None) -> list[dict]:
    base = {"cda": 80.0, "sre2l": 75.0, "random": 85.0, "herding": 84.0}
    rows = []
    for method, acc in base.items():
        for k, student in enumerate(STUDENTS):
            for seed in (0, 1):
                rows.append(make_record(method, 10, student, seed, acc - k + seed + (shift or {}).get(method, 0.0)))
    rows += [make_record("full", None, s, seed, 98.0) for s in STUDENTS for seed in (0, 1)]
    return rows


def test_leaderboard_is_byte_deterministic_and_carries_provenance(tmp_path):
    runs = write_records(tmp_path / "runs", grid_records())
    first = generate([runs], tmp_path / "a")
    generate([runs], tmp_path / "b")
    for name in ("digits.md", "digits.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {p.name for p in first} >= {"digits-heatmap.png", "digits-accuracy-vs-ipc.png", "digits-accuracy-vs-bytes.png"}
    assert (tmp_path / "a" / "digits-heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "a" / "digits.md").read_text()
    # cda is 5 points below random for every student and seed: Δ = -5.0 exactly, zero-width interval.
    assert "| cda | 80.5 ± 0.7 | 79.5 ± 0.7 | 78.5 ± 0.7 | 77.5 ± 0.7 | 79.0 | 77.5 | -5.0 [-5.0, -5.0] | 0,1 |" in md
    assert ("cda loses to random real images under the same soft labels (-5.0 points, 95 % interval [-5.0, -5.0])."
            in md)
    assert "Kendall τ" in md and "+1.00" in md   # identical rankings across students
    assert "cdabench run --suite t" in md and "cpu:test" in md
    csv_text = (tmp_path / "a" / "digits.csv").read_text()
    assert all(r["record_hash"] in csv_text for r in grid_records())


def test_verdict_says_beats_loses_or_not_distinguishable():
    rows = [make_record("random", 10, s, seed, 80.0) for s in STUDENTS for seed in (0, 1)]
    rows += [make_record("cda", 10, s, seed, 80.0 + (3.0 if seed == 0 else -2.0)) for s in STUDENTS for seed in (0, 1)]
    rows += [make_record("herding", 10, s, seed, 82.0 + 0.2 * seed) for s in STUDENTS for seed in (0, 1)]
    summary = summarise(rows)[0]
    text = {row.method: verdict(summary, row) for row in summary.rows}
    assert text["random"] is None
    # Δ per seed +3, -2: mean +0.5, t-interval 0.5 ± 12.71 x 2.5 = [-31.3, +32.3].
    assert text["cda"] == ("cda is not distinguishable from random real images under the same soft labels "
                           "(+0.5 points, 95 % interval [-31.3, +32.3]).")
    assert text["herding"].startswith("herding beats random real images under the same soft labels (+2.1 points")


def test_published_status_rules():
    assert published_status([], 50.0) == "not run"
    assert published_status([49.5], 50.0) == "reproduced"
    assert published_status([48.0], 50.0) == "within tolerance"
    assert published_status([40.0], 50.0) == "not reproduced"


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


def test_records_of_another_schema_version_are_refused(tmp_path):
    old = make_record("cda", 10, "resnet18", 0, 80.0)
    old["schema_version"] = 0
    runs = write_records(tmp_path / "old", [old])
    with pytest.raises(records.RecordError, match="schema_version 0 is not the supported 1"):
        generate([runs], tmp_path / "out")


def test_spread_is_shown_whenever_there_are_two_seeds():
    """Two seeds that agree exactly show '± 0.0'; one seed shows no spread at all."""
    from cdabench.results import report
    assert report.fmt(88.1, 0.0) == "88.1 ± 0.0"
    assert report.fmt(88.1, None) == "88.1"
    assert report.fmt(None) == "–"


def test_targets_are_k_standard_errors_and_two_sided_targets_catch_a_move_up(tmp_path):
    # Two seeds per cell: cda 80 / 82 (s = 1.414), random 85 / 86 (s = 0.707).
    rows = [make_record("cda", 10, "resnet18", seed, 80.0 + 2 * seed) for seed in (0, 1)]
    rows += [make_record("random", 10, "resnet18", seed, 85.0 + seed) for seed in (0, 1)]
    targets = write_targets(tmp_path / "t.csv", rows, two_sided=("cda",))
    by_method = {t.method: t for t in targets}
    assert by_method["cda"].target_top1 == 81.0 and by_method["cda"].sides == 2
    assert by_method["cda"].tolerance == round(3 * math.sqrt(2) / math.sqrt(2), 2)   # 3 x s / sqrt(n) = 3.0
    assert by_method["random"].tolerance == 1.5 and by_method["random"].sides == 1
    assert read_targets(tmp_path / "t.csv") == targets                               # the CSV round-trips
    up = [make_record("cda", 10, "resnet18", seed, 90.0) for seed in (0, 1)]
    up += [make_record("random", 10, "resnet18", seed, 95.0) for seed in (0, 1)]
    status = {s.target.method: s.status for s in compare(up, targets)}
    assert status == {"cda": "changed", "random": "ok"}      # better fails only where both sides are checked
    down = [make_record("cda", 10, "resnet18", seed, 77.9) for seed in (0, 1)]
    assert [s.status for s in compare(down, targets) if s.target.method == "cda"] == ["regressed"]


def test_a_target_looser_than_five_points_is_refused(tmp_path):
    rows = [make_record("sre2l", 10, "resnet18", seed, 60.0 + 8 * seed) for seed in (0, 1)]   # 3 x 5.66 / 1.41 = 12
    with pytest.raises(ValueError, match=r"too unstable for a regression target \(tolerance > 5 points\): "
                                         r"sre2l ipc10 resnet18 soft \(tolerance 12.00\)"):
        write_targets(tmp_path / "t.csv", rows)
    assert not (tmp_path / "t.csv").exists()


def test_a_target_on_another_record_field_catches_a_changed_distilled_set(tmp_path):
    """label_agreement (the teacher's agreement with a distilled set's labels) is a property of the
    set itself: CDA's crop-trained images score 88-97 % on digits, images recovered without crops 100 %."""
    rows = []
    for seed, agreement in enumerate((91.0, 97.0, 95.0, 96.0)):
        rows.append(make_record("cda", 10, "resnet18", seed, 70.0 + seed) | {"label_agreement": agreement})
    targets = write_targets(tmp_path / "t.csv", rows, two_sided=("cda",), metrics=("top1", "label_agreement"))
    agreement = next(t for t in targets if t.metric == "label_agreement")
    # mean 94.75; s = 2.63; 3 x s / sqrt(4) = 3.94
    assert (agreement.target_top1, agreement.tolerance, agreement.sides) == (94.75, 3.94, 2)
    assert read_targets(tmp_path / "t.csv") == targets
    no_crop = [make_record("cda", 10, "resnet18", seed, 70.0 + seed) | {"label_agreement": 100.0} for seed in range(4)]
    status = {s.target.metric: s.status for s in compare(no_crop, targets)}
    assert status == {"top1": "ok", "label_agreement": "changed"}
    unrecorded = compare([r | {"label_agreement": None} for r in no_crop], targets)
    assert [s.status for s in unrecorded if s.target.metric == "label_agreement"] == ["missing"]
