"""The same records give the same leaderboard, whoever generates it: records in another order
(and spread over run folders given in another order, each record's keys in another order), in
another process, on another Python. The Markdown and the CSV are compared byte for byte; the PNGs
too on this machine (their pixels depend on matplotlib's and FreeType's versions, so across
machines only the numbers they are drawn from, which are the page's, are promised)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from cdabench import stats
from cdabench.results.leaderboard import generate
from tests.fixtures import grid_records, leaderboard_in_subprocess, make_record, shuffled_runs, write_records

# Four seeds' top-1 on a 360-image test split whose exact mean is 83.75, a rounding boundary of the
# page's one decimal: Python 3.11's sum() gives 334.99999999999994 (83.7 printed), Python 3.12's
# compensated sum() 335.0 (83.8 printed).
BOUNDARY = [100 * 286 / 360, 100 * 355 / 360, 100 * 283 / 360, 100 * 282 / 360]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shuffled_records_in_another_process_give_the_same_page_byte_for_byte(tmp_path):
    rows = grid_records() + [make_record("cda", 1, s, seed, top1) for s in ("resnet18", "resnet50")
                             for seed, top1 in enumerate(BOUNDARY)]
    ordered = write_records(tmp_path / "ordered", rows)
    generate([ordered], tmp_path / "here")
    there = leaderboard_in_subprocess(tmp_path / "there", shuffled_runs(tmp_path / "shuffled", rows, seed=1),
                                      tmp_path / "mpl")
    here = _outputs(tmp_path / "here")
    assert {"digits.md", "digits.csv"} <= set(here) and any(n.endswith(".png") for n in here)
    assert sorted(here) == sorted(there)
    for name in here:
        assert here[name] == there[name], f"{name} differs between ordered records here and shuffled ones there"


def test_a_mean_on_a_rounding_boundary_prints_the_same_on_every_python(tmp_path):
    """The page's means are exactly rounded sums divided by the count: the value of the exact
    mean's nearest float, whatever the order of the seeds and whichever Python sums them."""
    exact = float(sum(Fraction(v) for v in BOUNDARY) / len(BOUNDARY))
    assert exact == 83.75 and f"{exact:.1f}" == "83.8"
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        assert stats.mean([BOUNDARY[i] for i in order]) == exact
    runs = write_records(tmp_path / "runs", [make_record("cda", 10, "resnet18", seed, top1)
                                             for seed, top1 in enumerate(BOUNDARY)])
    generate([runs], tmp_path / "out", plots=False)
    assert "| cda | 83.8 ± " in (tmp_path / "out" / "digits.md").read_text()
