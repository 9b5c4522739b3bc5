"""Cross-arch summaries: the verdict against random real images, the spread over seeds, and the
status of a published number."""
from __future__ import annotations

from cdabench.results.published import status as published_status
from cdabench.results.report import summarise, verdict
from tests.fixtures import STUDENTS, make_record


def test_verdict_says_beats_loses_or_not_distinguishable():
    seeds = (0, 1, 2)
    rows = [make_record("random", 10, s, seed, 80.0) for s in STUDENTS for seed in seeds]
    rows += [make_record("cda", 10, s, seed, 80.0 + (3.0, -2.0, 2.0)[seed]) for s in STUDENTS for seed in seeds]
    rows += [make_record("herding", 10, s, seed, 82.0 + 0.2 * seed) for s in STUDENTS for seed in seeds]
    rows += [make_record("sre2l", 10, s, seed, 70.0 - seed) for s in STUDENTS for seed in seeds]
    summary = summarise(rows)[0]
    text = {row.method: verdict(summary, row) for row in summary.rows}
    assert text["random"] is None
    # Δ per seed +3, -2, +2: mean +1, sd sqrt(7), half width t(0.975, 2) x sqrt(7) / sqrt(3) = 4.3027 x 1.5275 = 6.57.
    assert text["cda"] == ("cda is not distinguishable from random real images under the same soft labels "
                           "(+1.0 points, 95 % interval [-5.6, +7.6]).")
    # Δ 2.0, 2.2, 2.4: mean 2.2, sd 0.2, half width 0.50
    assert text["herding"] == ("herding beats random real images under the same soft labels "
                               "(+2.2 points, 95 % interval [+1.7, +2.7]).")
    # Δ -10, -11, -12: mean -11, sd 1, half width 2.48
    assert text["sre2l"] == ("sre2l loses to random real images under the same soft labels "
                             "(-11.0 points, 95 % interval [-13.5, -8.5]).")
    two = summarise([r for r in rows if r["seed"] < 2])[0]
    assert verdict(two, two.row("cda", "soft")) == ("cda: +0.5 points vs random real images (soft labels); 2 seeds, "
                                                    "too few for an interval (at least 3).")


def test_published_status_rules():
    assert published_status([], 50.0) == "not run"
    assert published_status([49.5], 50.0) == "reproduced"
    assert published_status([48.0], 50.0) == "within tolerance"
    assert published_status([40.0], 50.0) == "not reproduced"


def test_spread_is_shown_whenever_there_are_two_seeds():
    """Two seeds that agree exactly show '± 0.0'; one seed shows no spread at all."""
    from cdabench.results import report
    assert report.fmt(88.1, 0.0) == "88.1 ± 0.0"
    assert report.fmt(88.1, None) == "88.1"
    assert report.fmt(None) == "–"
