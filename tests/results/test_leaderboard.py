"""Leaderboards are byte-deterministic and carry their provenance."""
from __future__ import annotations

from cdabench.results.leaderboard import generate
from tests.fixtures import grid_records, write_records


def test_leaderboard_is_byte_deterministic_and_carries_provenance(tmp_path):
    runs = write_records(tmp_path / "runs", grid_records())
    first = generate([runs], tmp_path / "a")
    generate([runs], tmp_path / "b")
    for name in ("digits.md", "digits.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {p.name for p in first} >= {"digits-heatmap-ipc10.png", "digits-accuracy-vs-ipc.png",
                                       "digits-accuracy-vs-bytes.png"}
    assert (tmp_path / "a" / "digits-heatmap-ipc10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "a" / "digits.md").read_text()
    # cda is 5 points below random for every student and seed: Δ = -5.0 exactly, zero-width interval.
    assert "| cda | 81.0 ± 1.0 | 80.0 ± 1.0 | 79.0 ± 1.0 | 78.0 ± 1.0 | 79.5 | 78.0 | -5.0 [-5.0, -5.0] | 0,1,2 |" in md
    assert ("cda loses to random real images under the same soft labels (-5.0 points, 95 % interval [-5.0, -5.0])."
            in md)
    assert "Kendall τ" in md and "+1.00" in md   # identical rankings across students
    assert "cdabench run --suite t" in md and "cpu:test" in md
    csv_text = (tmp_path / "a" / "digits.csv").read_text()
    assert all(r["record_hash"] in csv_text for r in grid_records())




def test_a_row_with_too_few_seeds_prints_no_interval(tmp_path):
    """Two seeds give Student's t one degree of freedom (a +-70-point interval on a few points of
    spread): the page says n/a with the seed count instead, and the verdict says why."""
    runs = write_records(tmp_path / "runs", [r for r in grid_records() if r["seed"] != 2])
    generate([runs], tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "digits.md").read_text()
    assert "| cda | 80.5 ± 0.7 | 79.5 ± 0.7 | 78.5 ± 0.7 | 77.5 ± 0.7 | 79.0 | 77.5 | -5.0, n/a (2 seeds) | 0,1 |" in md
    assert "2 seeds, too few for an interval (at least 3)" in md
    assert "[-" not in md.split("## IPC 10")[1].split("Kendall")[0]
