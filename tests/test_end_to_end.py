"""A tiny distil + evaluate through the command line learns: accuracy well above chance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdabench.cli import main

TINY_TASK = """
dataset = "digits"
ipcs = [10]
holdout_fraction = 0.1
[teacher]
model = "resnet18"
epochs = 6
batch_size = 64
lr = 0.05
warmup_epochs = 1
augment = { crop = "none", flip = false }
[recover.cda]
iterations = 100
lr = 0.25
r_bn = 0.01
batch_size = 100
jitter = 1
[posttrain.recipe]
model = "resnet18"
epochs = 40
batch_size = 50
optimizer = "adamw"
lr = 0.001
weight_decay = 0.01
augment = { crop = "pad", pad = 1, flip = false }
[posttrain.kd]
temperature = 4.0
"""


@pytest.mark.slow
def test_distill_then_evaluate_learns(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "tiny.toml"
    task.write_text(TINY_TASK)
    common = ["--task", str(task), "--device", "cpu", "--quiet"]
    assert main(["distill", *common, "--method", "cda", "--ipc", "10", "--out", str(tmp_path / "cda")]) == 0
    assert main(["evaluate", *common, "--data", str(tmp_path / "cda"), "--student", "resnet18",
                 "--labels", "soft", "--seed", "0", "--out", str(tmp_path / "runs")]) == 0
    record = json.loads((tmp_path / "runs" / "records.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "cda" and record["ipc"] == 10 and record["num_images"] == 100
    assert record["label_protocol"] == "online-kd" and record["label_bytes"] == 0
    assert record["teacher_forwards"] == 40 * 100   # online KD: one teacher pass per augmented image
    # 10 classes: chance is 10 %. 100 synthetic images and soft labels must do far better.
    assert record["top1"] > 30.0, record["top1"]
