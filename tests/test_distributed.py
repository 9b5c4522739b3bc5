"""`torchrun --nproc-per-node 2` splits recover's shards across processes (gloo on CPU) and
produces exactly the images of a single-process run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdabench import artifacts

TINY_TASK = """
dataset = "digits"
ipcs = [4]
holdout_fraction = 0.1
[teacher]
model = "resnet18"
epochs = 4
batch_size = 64
lr = 0.05
warmup_epochs = 1
augment = { crop = "none", flip = false }
[recover.cda]
iterations = 3
batch_size = 20
jitter = 1
"""


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_splits_shards_and_matches_single_process(tmp_path: Path):
    task = tmp_path / "tiny.toml"
    task.write_text(TINY_TASK)
    env = dict(os.environ, CDABENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    common = ["distill", "--task", str(task), "--method", "cda", "--ipc", "4", "--device", "cpu", "--quiet"]
    single = _run([sys.executable, "-m", "cdabench.cli", *common, "--out", str(tmp_path / "single")], env)
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    multi = _run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cdabench.cli", *common,
                  "--out", str(tmp_path / "multi")], env)
    assert multi.returncode == 0, multi.stderr
    one = artifacts.read_json(tmp_path / "single" / "manifest.json")
    two = artifacts.read_json(tmp_path / "multi" / "manifest.json")
    # 10 classes x 4 IPC at 20 per batch: 2 shards, one per rank; same images, byte for byte.
    assert len(list((tmp_path / "multi" / "shards").glob("*.json"))) == 2
    assert len(two["files"]) == 40
    assert two["files"] == one["files"] and two["images_hash"] == one["images_hash"]
    for rel, digest in two["files"].items():
        assert artifacts.sha256_file(tmp_path / "multi" / "images" / rel) == digest
