"""A tiny distil + evaluate through the command line learns: accuracy well above chance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdabench.cli import main
from tests.fixtures import tiny_task_file

# The base tiny task (tests/fixtures.py) with a 6-epoch teacher, CDA at IPC 10 recovered 100
# iterations, and a ResNet-18 student post-trained 40 epochs with pad-1 crops.
TASK = {"ipcs": [10], "teacher.epochs": 6, "teacher.warmup_epochs": 1, "recover.cda.iterations": 100,
        "recover.sre2l": None, "posttrain.recipe.epochs": 40, "posttrain.recipe.decay_matrices_only": None,
        "posttrain.recipe.augment": {"crop": "pad", "pad": 1, "flip": False}}


@pytest.mark.slow
def test_distill_then_evaluate_learns(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    task = tiny_task_file(tmp_path / "tiny.toml", TASK)
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
