"""Watching a cell: its curve file (round-trips, its last epoch is the record's, its learning rates
are the schedule's), the TensorBoard event files read back with tensorboard's own reader, the W&B
offline run folder read back as W&B's own protobuf records, a missing logger package named with
its extra, and the suite's estimate of the time left."""
from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

from cdabench import progress, records
from cdabench.cli import main
from cdabench.config import ConfigError
from cdabench.engine.train import lr_at
from cdabench.engine.watch import Watch, curve_epochs, require
from cdabench.schema import AugmentSpec, TrainRecipe

EPOCHS = 4


def evaluate_cli(cli_common, distilled, out: Path, *extra: str) -> dict:
    """`cdabench evaluate` of the session's random set, hard labels (no teacher), EPOCHS epochs; its record."""
    argv = ["evaluate", *cli_common, "--data", str(distilled("random")), "--student", "resnet18", "--labels", "hard",
            "--epochs", str(EPOCHS), "--out", str(out), *extra]
    assert main(argv) == 0
    return records.read_records(out / "records.jsonl")[-1]


def test_curve_epochs_spread_the_points_and_keep_the_last():
    assert curve_epochs(100, 4) == {25, 50, 75, 100}
    assert curve_epochs(10, 3) == {3, 7, 10}          # round(10/3), round(20/3), 10
    assert curve_epochs(7, 0) == {7}
    assert curve_epochs(2, 5) == {1, 2}


@pytest.mark.slow
def test_curve_file_round_trips_and_its_last_epoch_is_the_records(cli_common, distilled, tmp_path):
    record = evaluate_cli(cli_common, distilled, tmp_path / "eval", "--curve-points", "2")
    path = tmp_path / "eval" / record["curve"]
    assert path.parent.name == "curves" and path.is_file()
    curve = records.read_curve(tmp_path / "eval", record)
    epochs = curve["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert [e["epoch"] for e in epochs if "heldout_top1" in e] == [2, 4]
    assert epochs[-1]["loss"] == record["final_loss"] and epochs[-1]["heldout_top1"] == record["heldout_top1"]
    # The learning rate of an epoch is the schedule's at its last step (the recipe is in the record).
    recipe = TrainRecipe(**{**record["recipe"], "augment": AugmentSpec(**record["recipe"]["augment"])})
    steps = math.ceil(record["num_images"] / recipe.batch_size)
    assert [e["lr"] for e in epochs] == [lr_at(recipe, e * steps - 1, steps) for e in range(1, EPOCHS + 1)]
    # Written again from what was read: the same bytes.
    again = records.write_curve(tmp_path / "again", curve["key"], {"curve": {k: v for k, v in curve.items() if k != "key"}})
    assert (tmp_path / "again" / again["curve"]).read_bytes() == path.read_bytes()
    # Held-out evaluations during training change nothing in the result.
    bare = evaluate_cli(cli_common, distilled, tmp_path / "bare", "--curve-points", "0")
    assert (bare["top1"], bare["heldout_top1"], bare["final_loss"]) == \
        (record["top1"], record["heldout_top1"], record["final_loss"])
    assert [e["loss"] for e in records.read_curve(tmp_path / "bare", bare)["epochs"]] == [e["loss"] for e in epochs]


@pytest.mark.slow
def test_tensorboard_event_files_read_back_with_tensorboards_reader(cli_common, distilled, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    record = evaluate_cli(cli_common, distilled, tmp_path / "eval", "--log", "tensorboard", "--curve-points", "2")
    run_dir = tmp_path / "eval" / "tensorboard" / record["task"] / "random" / "ipc2" / "resnet18" / "hard" / "seed0"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "heldout/top1", "test/top1", "test/top5"}
    assert "config/text_summary" in events.Tags()["tensors"]
    curve = records.read_curve(tmp_path / "eval", record)["epochs"]
    losses = events.Scalars("train/loss")
    assert [s.step for s in losses] == list(range(1, EPOCHS + 1))
    # Event files hold float32: equal to the curve's float64 values at float32's resolution.
    assert all(math.isclose(s.value, e["loss"], rel_tol=2 ** -23) for s, e in zip(losses, curve))
    assert [(s.step, pytest.approx(s.value, rel=2 ** -23)) for s in events.Scalars("heldout/top1")] == \
        [(e["epoch"], e["heldout_top1"]) for e in curve if "heldout_top1" in e]
    assert events.Scalars("test/top1")[0].value == pytest.approx(record["top1"], rel=2 ** -23)


def wandb_file_records(path: Path) -> list:
    """The protobuf Records of a W&B run file (run-<id>.wandb): after its 7-byte header (':W&B', a
    2-byte magic, a version byte), a LevelDB-style log of 32 KiB blocks, each record a 7-byte header
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last part) and its bytes; parsed with W&B's
    own Record message."""
    from wandb.proto import wandb_internal_pb2
    data, block, position, pending, payloads = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):   # a block's zero-filled tail
            position += left
            continue
        payload, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            payloads.append(pending)
    parsed = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        parsed.append(record)
    return parsed


@pytest.mark.slow
def test_wandb_offline_writes_its_run_folder(cli_common, distilled, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_SILENT", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                 "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, "unset-by-the-test")   # the run sets them; monkeypatch restores them after
    record = evaluate_cli(cli_common, distilled, tmp_path / "eval", "--log", "wandb")
    runs = list((tmp_path / "eval" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    parsed = wandb_file_records(runs[0])
    run = next(r.run for r in parsed if r.WhichOneof("record_type") == "run")
    assert run.display_name == f"{record['task']}/random/ipc2/resnet18/hard/seed0"
    config = {item.key: item.value_json for item in run.config.update}
    assert config["student"] == '"resnet18"' and config["labels"] == '"hard"'
    rows = [{item.key or "/".join(item.nested_key): float(item.value_json) for item in r.history.item}
            for r in parsed if r.WhichOneof("record_type") == "history"]
    assert [int(row["_step"]) for row in rows] == list(range(1, EPOCHS + 1))
    assert rows[-1]["test/top1"] == record["top1"] and rows[-1]["train/loss"] == record["final_loss"]
    assert not any(r.WhichOneof("record_type") == "files" for r in parsed)   # no code, no requirements captured


def test_a_missing_logger_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # as if it were not installed
    with pytest.raises(ConfigError, match=r"--log wandb needs the wandb package.*pip install 'cdabench\[loggers\]'"):
        require("wandb")
    with pytest.raises(ConfigError, match="unknown logger"):
        Watch(loggers=("mlflow",))


def test_remaining_time_from_planned_costs_and_the_measured_rate():
    now = [100.0]
    left = progress.Remaining(total=400, clock=lambda: now[0])
    assert left.seconds() is None and str(left) == "estimating the time left"
    now[0] = 130.0
    left.advance(100)                        # 100 of 400 steps in 30 s: 300 more take 90 s
    assert left.seconds() == pytest.approx(90.0) and str(left) == "about 1m30s left"
    now[0] = 190.0
    left.advance(300)
    assert left.seconds() == 0.0
    assert progress.duration(3725) == "1h02m" and progress.duration(42.4) == "42s"
