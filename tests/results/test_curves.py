"""`cdabench leaderboard --curves PATTERN`: the cells whose names match are read from their curve
files and drawn; a pattern that matches no cell is refused with what names look like."""
from __future__ import annotations

import json

import pytest

from cdabench import records
from cdabench.cli import main
from cdabench.results.leaderboard import select_curves
from tests.fixtures import make_record


def run_with_curves(folder):
    rows = []
    for method, seed in (("cda", 0), ("cda", 1), ("random", 0)):
        name = f"{method}/ipc10/resnet18/soft/seed{seed}"
        record = make_record(method, 10, "resnet18", seed, 80.0 + seed, task="digits")
        epochs = [{"epoch": e, "loss": 2.0 / e, "lr": 0.01 * (4 - e) / 3} for e in range(1, 5)]
        epochs[1]["heldout_top1"], epochs[3]["heldout_top1"] = 50.0, record["heldout_top1"]
        record = dict(record, cell=name, curve={"kind": "cdabench-curve", "format_version": 1, "name": name,
                                                "epochs": epochs})
        record = records.write_curve(folder, f"key{len(rows)}", record)
        record["record_hash"] = records.record_id({k: v for k, v in record.items() if k != "record_hash"})
        rows.append(record)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return folder


def test_selected_curves_are_drawn(tmp_path, capsys):
    run = run_with_curves(tmp_path / "run")
    picked = select_curves([run], ["cda/*"])
    assert [r["cell"] for r, _ in picked] == ["cda/ipc10/resnet18/soft/seed0", "cda/ipc10/resnet18/soft/seed1"]
    assert picked[0][1]["epochs"][1]["heldout_top1"] == 50.0 and picked[0][1]["key"] == "key0"
    assert main(["leaderboard", "--runs", str(run), "--out", str(tmp_path / "board"), "--curves", "*/seed0"]) == 0
    png = tmp_path / "board" / "digits-curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![digits-curves.png](digits-curves.png)" in (tmp_path / "board" / "digits.md").read_text()
    with pytest.raises(records.RecordError, match="no cell with a curve matches sre2l/\\*: cell names look like"):
        select_curves([run], ["sre2l/*"])
