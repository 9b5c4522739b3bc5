"""Cross-arch summaries: the verdict against random real images, the spread over seeds, and the
status of a published number."""
from __future__ import annotations

from cdabench.results.published import status as published_status
from cdabench.results.report import summarise, verdict
from tests.fixtures import STUDENTS, make_record


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


def test_spread_is_shown_whenever_there_are_two_seeds():
    """Two seeds that agree exactly show '± 0.0'; one seed shows no spread at all."""
    from cdabench.results import report
    assert report.fmt(88.1, 0.0) == "88.1 ± 0.0"
    assert report.fmt(88.1, None) == "88.1"
    assert report.fmt(None) == "–"
