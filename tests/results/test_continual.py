"""Continual tables: the published numbers are shown with a status."""
from __future__ import annotations

import json

from cdabench.results import continual as report
from cdabench.results.published import read_continual


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
