"""Precision is a recorded setting: fp32 by default (the papers'), bf16 on request, on CPU too."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cdabench.cli import main
from cdabench.config import load_task
from cdabench.engine.runtime import autocast, bf16_supported, check_precision

CPU = torch.device("cpu")


def test_autocast_follows_the_precision_on_cpu():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="use fp32 or bf16"):
        check_precision("fp16", CPU)


def test_papers_tasks_default_to_fp32():
    for name in ("tiny-imagenet", "imagenet-1k", "imagenet-21k", "cifar100"):
        assert load_task(name).precision == "fp32"


@pytest.mark.skipif(not bf16_supported(CPU), reason="this CPU has no native bf16")
def test_bf16_run_records_its_precision(tiny_task_path, private_cache, tmp_path):
    """distil + evaluate under --precision bf16: the manifest and the record say bf16; the fp32 run
    of the same cell says fp32 (the default)."""
    common = ["--task", str(tiny_task_path), "--cache-dir", str(private_cache), "--device", "cpu", "--quiet"]
    for precision in ("bf16", "fp32"):
        flag = ["--precision", precision] if precision == "bf16" else []
        out = tmp_path / f"cda-{precision}"
        assert main(["distill", *common, *flag, "--method", "cda", "--ipc", "1", "--out", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["precision"] == precision
        assert main(["evaluate", *common, *flag, "--data", str(out), "--epochs", "1",
                     "--out", str(tmp_path / "runs")]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "runs" / "records.jsonl").read_text().splitlines()]
    assert (first["precision"], first["recover_precision"]) == ("bf16", "bf16")
    assert (second["precision"], second["recover_precision"]) == ("fp32", "fp32")
    assert first["hashes"]["teacher"] != second["hashes"]["teacher"]   # bf16 trains its own teacher
