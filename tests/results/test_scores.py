"""What the images add: the hard-label recovery and the augmentation share equal a hand computation
on known records, and the leaderboard (Markdown, scores CSV) and the terminal show them; the
regression check and the accuracy-vs-IPC figure keep augmentation-off cells out of the standard
protocol's numbers."""
from __future__ import annotations

import pytest

from cdabench import records
from cdabench.results import report
from cdabench.results.check import Target, compare
from cdabench.results.leaderboard import generate
from tests.fixtures import make_record, write_records

STUDENTS = ("resnet18", "resnet50")
OFFSET = {"resnet18": 0.0, "resnet50": -2.0}   # every panel mean (over the two students) is value - 1
# Three seeds: the fewest an interval is computed from (stats.MIN_INTERVAL_VALUES).
# (method, ipc, labels, augmentation): top-1 for seeds 0, 1 and 2, before the student offset.
GRID = {
    ("random", 10, "soft", "on"): (80.0, 82.0, 81.0), ("cda", 10, "soft", "on"): (85.0, 84.0, 86.0),
    ("random", 10, "soft", "off"): (70.0, 71.0, 72.0), ("cda", 10, "soft", "off"): (72.0, 74.0, 73.0),
    ("random", 10, "hard", "on"): (66.0, 65.0, 64.0), ("cda", 10, "hard", "on"): (60.0, 64.0, 62.0),
    ("full", None, "hard", "on"): (97.0, 96.0, 98.0), ("full", None, "soft", "on"): (98.0, 98.0, 98.0),
}


def known_records() -> list[dict]:
    rows = []
    for (method, ipc, labels, augment), by_seed in GRID.items():
        for student in STUDENTS:
            for seed, top1 in enumerate(by_seed):
                record = make_record(method, ipc, student, seed, top1 + OFFSET[student], labels=labels)
                record["augmentation"] = augment
                record["record_hash"] = records.record_id({k: v for k, v in record.items() if k != "record_hash"})
                rows.append(record)
    return rows


def test_scores_equal_a_hand_computation():
    summary = report.summarise(known_records())[0]
    scores = {s.method: s for s in report.image_scores(summary)}
    t = 4.302652729749464   # Student t, 2 degrees of freedom, 97.5 %: three seeds
    cda = scores["cda"]
    # Δ vs random, soft, per seed: 85 - 80 = 5, 84 - 82 = 2, 86 - 81 = 5 (the student offsets cancel):
    # mean 4, sample std sqrt(3), half-width t * sqrt(3) / sqrt(3) = t.
    assert (cda.delta_soft.mean, cda.delta_soft.n) == (4.0, 3)
    assert cda.delta_soft.half_width == pytest.approx(t)
    assert cda.delta_hard.mean == pytest.approx(-3.0)                 # 60 - 66, 64 - 65, 62 - 64
    hlr = cda.hard_label_recovery                                      # 97 - 60, 96 - 64, 98 - 62: 37, 32, 36
    assert hlr.mean == pytest.approx(35.0) and hlr.half_width == pytest.approx(t * 7 ** 0.5 / 3 ** 0.5)
    assert cda.delta_soft_no_augment.mean == pytest.approx(2.0)       # 72 - 70, 74 - 71, 73 - 72
    share = cda.augmentation_share                                    # 5 - 2, 2 - 3, 5 - 1: 3, -1, 4
    assert share.mean == pytest.approx(2.0) and share.half_width == pytest.approx(t * 7 ** 0.5 / 3 ** 0.5)
    rnd = scores["random"]
    assert rnd.delta_soft is None and rnd.augmentation_share is None
    assert rnd.hard_label_recovery.mean == pytest.approx(32.0)        # 31, 31, 34
    assert report.rich_scores_table(summary) is not None
    # Without the extra cells there is nothing to show, and the page says which settings measure it.
    plain = report.summarise([r for r in known_records() if r["augmentation"] == "on" and r["method"] != "full"])[0]
    assert not report.has_image_scores(plain) and report.rich_scores_table(plain) is None


def test_the_leaderboard_shows_the_scores(tmp_path):
    runs = write_records(tmp_path / "runs", known_records())
    generate([runs], tmp_path / "board", plots=False)
    md = (tmp_path / "board" / "digits.md").read_text()
    assert ("| method | Δ vs random | Δ vs random (hard) | hard-label recovery | Δ vs random, aug off | "
            "augmentation share |") in md
    assert "| cda | +4.0 [-0.3, +8.3] | -3.0 [-9.6, +3.6] | +35.0 [+28.4, +41.6] | +2.0 [-0.5, +4.5] | " \
           "+2.0 [-4.6, +8.6] |" in md
    assert "| random | – | – | +32.0 [+27.7, +36.3] | – | – |" in md
    assert "| cda (no aug) | 73.0 ± 1.0 | 71.0 ± 1.0 | 72.0 | 71.0 | +2.0 [-0.5, +4.5] | 0,1,2 |" in md
    scores = (tmp_path / "board" / "digits-scores.csv").read_text().splitlines()
    assert scores[0] == "task,ipc,method,score,mean,low,high,seeds"
    assert "digits,10,cda,hard_label_recovery,35.00,28.43,41.57,3" in scores
    assert "digits,10,cda,augmentation_share,2.00,-4.57,8.57,3" in scores
    cells = (tmp_path / "board" / "digits.csv").read_text().splitlines()
    assert cells[0].split(",")[:9] == ["task", "dataset", "method", "ipc", "student", "labels", "label_protocol",
                                      "augmentation", "seed"]
    assert sum(",off," in line for line in cells) == 12


def test_augmentation_off_cells_stay_out_of_the_standard_protocols_numbers():
    target = Target("digits", "cda", 10, "resnet18", "soft", 85.0, 1.0)
    (status,) = compare(known_records(), [target])
    assert (status.measured, status.seeds) == (85.0, 3)          # 85, 84, 86: the off cells are not averaged in
