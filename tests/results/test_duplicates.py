"""A folder holding two records of one cell (two runs launched on it by an older version, or a
record copied by hand) is one measurement of that cell: the leaderboard and the check count it
once, the first recorded, and say so. A cell measured again (another cell_key: an edited task run
with --remeasure, or a later run folder) is a second measurement: the later one counts, and the
leaderboard says which it left out."""
from __future__ import annotations

import csv
import io

from cdabench import artifacts, records
from cdabench.cli import main
from cdabench.results.check import compare, read_targets, write_targets
from cdabench.results.leaderboard import generate
from tests.fixtures import grid_records, write_records


def _cell(r: dict) -> str:
    return f"{r['method']}/ipc{r['ipc'] if r['ipc'] is not None else 'full'}/{r['student']}/{r['labels']}/seed{r['seed']}"


def _rehashed(r: dict, **changes) -> dict:
    r = dict(r, **changes)
    r["record_hash"] = records.record_id(r)
    return r


def _suite_records() -> list[dict]:
    """The grid's records as a suite writes them: a cell name and a cell_key each."""
    return [_rehashed(r, cell=_cell(r), cell_key=artifacts.hash_config(_cell(r))) for r in grid_records()]


def test_a_duplicated_cell_is_counted_once_by_the_leaderboard_which_says_so(tmp_path, capsys):
    rows = _suite_records()
    # The same cell run again: another top-1 and duration, so another record hash, the same cell_key.
    again = _rehashed(rows[0], top1=rows[0]["top1"] - 30.0, seconds={"posttrain": 9.0})
    generate([write_records(tmp_path / "clean", rows)], tmp_path / "a", plots=False)
    generate([write_records(tmp_path / "twice", rows + [again])], tmp_path / "b", plots=False)
    assert "warning: 1 more record(s) of cells already counted" in capsys.readouterr().err
    assert (tmp_path / "a" / "digits.csv").read_bytes() == (tmp_path / "b" / "digits.csv").read_bytes()
    clean, twice = ((tmp_path / f / "digits.md").read_text().splitlines() for f in ("a", "b"))
    said = [line for line in twice if line.startswith("- duplicates:")]
    assert said == [f"- duplicates: 1 more record(s) of cells already counted (same cell_key: two runs on one folder, "
                    f"or a copied record) are left out, each cell counted once: {rows[0]['cell']}"]
    assert [line for line in twice if line not in said] == clean          # every number as without the copy
    assert f"- records: {len(rows)} " in "\n".join(clean)


def test_the_check_counts_a_duplicated_cell_once_and_says_so(tmp_path, capsys):
    rows = _suite_records()
    targets = tmp_path / "targets.csv"
    write_targets(targets, rows)
    listed = read_targets(targets)
    # cda's seed-0 cells recorded a second time, 30 points lower: counted, they would pull cda's
    # mean over seeds from 80.5 - k to 70.3 - k, far outside its tolerance.
    copies = [_rehashed(r, top1=r["top1"] - 30.0) for r in rows if r["method"] == "cda" and r["seed"] == 0]
    assert [s.measured for s in compare(rows + copies, listed)] == [s.measured for s in compare(rows, listed)]
    folder = write_records(tmp_path / "twice", rows + copies)
    assert main(["check", "--suite", "cross-arch", "--targets", str(targets), "--records", str(folder)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"{folder}: 4 more record(s) of cells already counted (same cell_key: two runs on one folder, or a " \
           "copied record) are left out, each cell counted once" in out
    assert "20 passed, 0 failed" in out



def test_a_cell_measured_again_counts_its_later_measurement_and_the_leaderboard_says_so(tmp_path, capsys):
    rows = _suite_records()
    # The first cell measured again from another set (another cell_key), 30 points lower.
    later = _rehashed(rows[0], top1=rows[0]["top1"] - 30.0, cell_key=artifacts.hash_config("another set"))
    generate([write_records(tmp_path / "expected", [later] + rows[1:])], tmp_path / "a", plots=False)
    generate([write_records(tmp_path / "again", rows + [later])], tmp_path / "b", plots=False)
    generate([write_records(tmp_path / "first", rows), write_records(tmp_path / "second", [later])], tmp_path / "c",
             plots=False)
    err = capsys.readouterr().err
    said = (f"1 earlier measurement(s) of cells measured again (another cell_key: an edited task run with "
            f"--remeasure, or a later run folder read after this one) are superseded by the later record: "
            f"{rows[0]['cell']}")
    assert err.count(f"warning: {said}") == 2
    expected = (tmp_path / "a" / "digits.csv").read_bytes()
    cell = [row for row in csv.DictReader(io.StringIO(expected.decode())) if row["record_hash"] == later["record_hash"]]
    assert [row["top1"] for row in cell] == [f"{rows[0]['top1'] - 30.0:.2f}"]
    for folder in ("b", "c"):
        assert (tmp_path / folder / "digits.csv").read_bytes() == expected
        page = (tmp_path / folder / "digits.md").read_text().splitlines()
        assert f"- duplicates: {said}" in page
    # The later measurement read twice: the copy is a repeat, the first measurement superseded.
    kept, left_out = records.unique_cells(rows + [later, later])
    assert [r["record_hash"] for r in kept] == [r["record_hash"] for r in rows[1:] + [later]]
    assert records.describe_left_out(kept, left_out) == (
        "1 more record(s) of cells already counted (same cell_key: two runs on one folder, or a copied record) are "
        f"left out, each cell counted once: {rows[0]['cell']}; " + said)


def test_one_cell_name_of_two_students_is_two_cells():
    """A continual cell's name omits the suite's student, and one folder may hold two students' runs:
    the same name with another student is another cell, never a measurement superseded."""
    rows = _suite_records()
    other = _rehashed(rows[0], student="resnet50", cell_key=artifacts.hash_config("the other student"))
    assert other["cell"] == rows[0]["cell"]
    kept, left_out = records.unique_cells(rows + [other])
    assert kept == rows + [other] and left_out == []
