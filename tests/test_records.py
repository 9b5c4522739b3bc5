"""The record file: records of another schema version are refused; the ranks' records of a torchrun
run merge into it once, in plan order."""
from __future__ import annotations

from pathlib import Path

import pytest

from cdabench import records
from cdabench.results.leaderboard import generate
from tests.fixtures import make_record, write_records


def _record(key: str, top1: float) -> dict:
    return {"task": "t", "method": "m", "ipc": 1, "student": "s", "labels": "soft", "seed": 0, "top1": top1,
            "top5": 100.0, "epochs": 1, "image_bytes": 1, "label_bytes": 0, "seconds": {}, "device": "cpu",
            "versions": {}, "hashes": {}, "cell_key": key}


def test_rank_records_merge_once_in_plan_order(tmp_path: Path):
    from cdabench import records
    main = tmp_path / "records.jsonl"
    records.append_record(main, _record("k1", 1.0))
    part0, part1 = tmp_path / "ranks/rank0/records.jsonl", tmp_path / "ranks/rank1/records.jsonl"
    records.append_record(part0, _record("k3", 3.0))
    records.append_record(part1, _record("k2", 2.0))
    records.append_record(part1, _record("k1", 9.0))   # already merged before a crash: not again
    merged = records.merge_records(main, [part0, part1], order=["k1", "k2", "k3"])
    assert [r["cell_key"] for r in merged] == ["k2", "k3"]
    stored = records.read_records(main)
    assert [(r["cell_key"], r["top1"]) for r in stored] == [("k1", 1.0), ("k2", 2.0), ("k3", 3.0)]
    assert not part0.exists() and not part1.exists()
    assert records.merge_records(main, [part0, part1]) == [] and records.read_records(main) == stored


def test_records_of_another_schema_version_are_refused(tmp_path):
    old = make_record("cda", 10, "resnet18", 0, 80.0)
    old["schema_version"] = 0
    runs = write_records(tmp_path / "old", [old])
    with pytest.raises(records.RecordError, match="schema_version 0 is not the supported 1"):
        generate([runs], tmp_path / "out")
