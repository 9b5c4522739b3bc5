"""Continual tables: the published numbers are shown beside ours, step by step, with a status."""
from __future__ import annotations

from cdabench.results import continual as report
from cdabench.results.published import read_continual

SOURCE = "SRe2L (NeurIPS 2023) §3.7"


def _record(seed: int, seen: list[float], masked: bool = False, **changes) -> dict:
    return {"continual": True, "dataset": "tiny-imagenet", "steps": 5, "ipc": 100, "memory": "sre2l",
            "protocol": "retrain", "student": "resnet18", "masked": masked, "seed": seed, "seen_accuracy": seen,
            **changes}


def test_published_continual_numbers_are_shown_with_a_status():
    published = read_continual()
    assert [p["top1"] for p in published] == [45.6, 48.5, 49.4, 49.8, 49.9]
    lines = "\n".join(report.markdown_section([], published))
    assert lines.count("| not run |") == 5 and "| 5 | 200 | 49.9 |" in lines
    records = [
        _record(0, [45.0, 48.0, 49.0, 49.5, 40.0]),
        _record(1, [45.2, 44.0, 45.0, 43.5, 40.2]),
        _record(0, [50.0, 51.0, 52.0, 53.0, 54.0], masked=True),     # our fix of the leak: its own column
        _record(0, [99.0] * 5, student="resnet50"),                   # another student: not the published cell
        _record(0, [99.0] * 5, steps=10),                             # another scenario
    ]
    # By hand, per step: the two unmasked seeds' mean ± sample std, the status of the mean's gap to the
    # published number (reproduced: >= -1 point; within tolerance: >= -max(3, 2 std); else not
    # reproduced), and the single masked record (no spread shown for one seed).
    assert report.published_rows(records, published) == [
        ["1", "40", "45.6", "45.1 ± 0.1", "reproduced", "50.0", SOURCE],            # gap -0.5
        ["2", "80", "48.5", "46.0 ± 2.8", "within tolerance", "51.0", SOURCE],      # gap -2.5
        ["3", "120", "49.4", "47.0 ± 2.8", "within tolerance", "52.0", SOURCE],     # gap -2.4
        ["4", "160", "49.8", "46.5 ± 4.2", "within tolerance", "53.0", SOURCE],     # gap -3.3, 2 std = 8.5
        ["5", "200", "49.9", "40.1 ± 0.1", "not reproduced", "54.0", SOURCE],      # gap -9.8
    ]
