"""A tiny distil + evaluate through the command line learns: accuracy well above chance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdabench.cli import main
from tests.fixtures import tiny_task_file

# The base tiny task (tests/fixtures.py) and its teacher (the session's, conftest.py), CDA at IPC 10
# recovered 30 iterations, and a ResNet-18 student post-trained 20 epochs with pad-1 crops. With
# this teacher, 30 iterations and 20 epochs reached 74.7 and 77.5 % top-1 (seeds 0, 1; 100 and 40,
# the settings before, 86.9 %); far above the 30 % this test asks for.
TASK = {"ipcs": [10], "recover.cda.iterations": 30, "recover.sre2l": None, "posttrain.recipe.epochs": 20,
        "posttrain.recipe.decay_matrices_only": None, "posttrain.recipe.augment": {"crop": "pad", "pad": 1, "flip": False}}


@pytest.mark.slow
def test_distill_then_evaluate_learns(tmp_path: Path, private_cache):
    task = tiny_task_file(tmp_path / "tiny.toml", TASK)
    common = ["--task", str(task), "--cache-dir", str(private_cache), "--device", "cpu", "--quiet"]
    assert main(["distill", *common, "--method", "cda", "--ipc", "10", "--out", str(tmp_path / "cda")]) == 0
    assert main(["evaluate", *common, "--data", str(tmp_path / "cda"), "--student", "resnet18",
                 "--labels", "soft", "--seed", "0", "--out", str(tmp_path / "runs")]) == 0
    record = json.loads((tmp_path / "runs" / "records.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "cda" and record["ipc"] == 10 and record["num_images"] == 100
    assert record["label_protocol"] == "online-kd" and record["label_bytes"] == 0
    assert record["teacher_forwards"] == 20 * 100   # online KD: one teacher pass per augmented image
    # 10 classes: chance is 10 %. 100 synthetic images and soft labels must do far better.
    assert record["top1"] > 30.0, record["top1"]
