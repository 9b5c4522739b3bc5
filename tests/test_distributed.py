"""`torchrun --nproc-per-node 2` splits recover's shards across processes (gloo on CPU) and
produces exactly the images of a single-process run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cdabench import artifacts
from tests.fixtures import TINY_CONTINUAL_SUITE, child_env, suite_file, tiny_task_file

# The base tiny task (tests/fixtures.py) with a 4-epoch teacher, CDA at IPC 4 in batches of 20
# (two shards: one per rank) and no post-train settings.
TASK = {"ipcs": [4], "teacher.epochs": 4, "teacher.warmup_epochs": 1,
        "recover.cda": {"iterations": 3, "batch_size": 20, "jitter": 1}, "recover.sre2l": None, "posttrain": None}


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_splits_shards_and_matches_single_process(tmp_path: Path):
    task = tiny_task_file(tmp_path / "tiny.toml", TASK)
    env = child_env(CDABENCH_CACHE=str(tmp_path / "cache"))
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


# --- launch safety -------------------------------------------------------------------------------


# --- suites under torchrun -----------------------------------------------------------------------


# ... at IPC 2, post-trained 2 epochs in batches of 20.
SUITE_TASK = {**TASK, "ipcs": [2], "posttrain.recipe": {"epochs": 2, "batch_size": 20, "optimizer": "adamw", "lr": 0.001}}


@pytest.mark.slow
def test_suite_under_torchrun_records_every_cell_once_like_one_process(tmp_path: Path, monkeypatch):
    """`cdabench run` under `torchrun --nproc-per-node 2` (gloo), each rank with 2 spawned cell
    workers: the workers do not join (and hang) the ranks' process group; resuming a killed
    2-rank run (a rank's records not merged yet) skips its finished cell; every cell is recorded
    exactly once, with the single-process run's cell keys and accuracies (one thread everywhere)."""
    from cdabench import records
    from cdabench.harness.run import run_suite
    from cdabench.harness.suites import load_suite
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    task = tiny_task_file(tmp_path / "tiny.toml", SUITE_TASK)
    suite = suite_file(tmp_path / "suite.toml", task, seeds=[0, 1])
    one = run_suite(load_suite(str(suite)), tmp_path / "one", device="cpu", workers=1)
    assert len(one) == 6
    # A killed 2-rank run: rank 1 had finished one cell, rank 0 never merged it.
    planted = records.append_record(tmp_path / "multi/ranks/rank1/records.jsonl", one[2])
    env = child_env(CDABENCH_CACHE=str(tmp_path / "cache"))
    torchrun = Path(sys.executable).with_name("torchrun")
    multi = _run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cdabench.cli", "run",
                  "--suite", str(suite), "--out", str(tmp_path / "multi"), "--device", "cpu",
                  "--workers", "2", "--quiet"], env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    stored = records.read_records(tmp_path / "multi" / "records.jsonl")
    assert sorted(r["cell_key"] for r in stored) == sorted(r["cell_key"] for r in one)  # every cell, once
    assert [r["cell_key"] for r in stored if r["cell_key"] == planted["cell_key"]] == [planted["cell_key"]]
    assert next(r for r in stored if r["cell_key"] == planted["cell_key"])["record_hash"] == planted["record_hash"]
    by_key = {r["cell_key"]: r for r in stored}
    fields = ("cell", "top1", "heldout_top1", "final_loss", "hashes")
    assert [[r[f] for f in fields] for r in one] == [[by_key[r["cell_key"]][f] for f in fields] for r in one]
    assert not list((tmp_path / "multi" / "ranks").rglob("records.jsonl"))  # merged and removed
    # A re-run under torchrun finds every cell recorded and writes nothing.
    again = _run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cdabench.cli", "run",
                  "--suite", str(suite), "--out", str(tmp_path / "multi"), "--device", "cpu", "--quiet"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert records.read_records(tmp_path / "multi" / "records.jsonl") == stored


# --- data-parallel training ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("labels", ["hard", "online"])
def test_ddp_training_matches_one_process_on_the_same_global_batch(tmp_path: Path, labels: str):
    """Two gloo ranks, each with its share of every global batch (5/5 and 2/1 images), train a
    BN-free CNN to the weights one process reaches: the same order, views, CutMix partners and
    online-KD targets, the same steps and schedule, the loss weighted by each rank's share.
    What differs is the order of floating-point sums (gradient all-reduce): 1e-5 relative."""
    import torch
    script = Path(__file__).with_name("ddp_train_script.py")
    env = child_env()
    single = _run([sys.executable, str(script), labels, str(tmp_path / "one.pt")], env)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    multi = _run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), labels,
                  str(tmp_path / "two.pt")], env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for name, weight in one["state"].items():
        torch.testing.assert_close(two["state"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    assert int(two["teacher_forwards"]) == int(one["teacher_forwards"]) == (69 if labels == "online" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("topk", [0, 3])
def test_two_rank_relabel_equals_one_rank_byte_for_byte(tmp_path: Path, topk: int):
    """The label store's epochs dealt over two gloo ranks: the same epoch files, byte for byte,
    and the same manifest hash as one process; rank 0 alone writes the manifest."""
    script = Path(__file__).with_name("ddp_train_script.py")
    env = child_env()
    single = _run([sys.executable, str(script), f"relabel-{topk}", str(tmp_path / "one")], env)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    multi = _run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), f"relabel-{topk}",
                  str(tmp_path / "two")], env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = artifacts.read_json(tmp_path / "one/labels.json"), artifacts.read_json(tmp_path / "two/labels.json")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "epoch_0004.pt", "labels.json"]
    for name in one["files"]:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert two["label_hash"] == one["label_hash"] and two["label_bytes"] == one["label_bytes"]
    assert two["teacher_forwards"] == one["teacher_forwards"] == 5 * 23


@pytest.mark.slow
def test_torchrun_trains_the_teacher_and_post_trains_data_parallel_writing_one_record(tmp_path: Path):
    """`cdabench distill` then `cdabench evaluate` under torchrun with an empty cache: both ranks
    train the teacher (DDP; rank 0 saves it), recover their shards, post-train the student
    data-parallel with online KD, and rank 0 alone appends the one record."""
    from cdabench import records
    task = tiny_task_file(tmp_path / "tiny.toml", TASK)
    env = child_env(CDABENCH_CACHE=str(tmp_path / "cache"))
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                "-m", "cdabench.cli"]
    common = ["--task", str(task), "--device", "cpu", "--quiet"]
    distilled = _run([*torchrun, "distill", *common, "--method", "cda", "--ipc", "4", "--out", str(tmp_path / "d")],
                     env)
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    evaluated = _run([*torchrun, "evaluate", *common, "--data", str(tmp_path / "d"), "--epochs", "2",
                      "--out", str(tmp_path / "runs")], env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    teacher_info = artifacts.read_json(next((tmp_path / "cache" / "teachers").glob("*/teacher.json")))
    assert teacher_info["ranks"] == 2 and teacher_info["heldout_top1"] >= 50.0  # the guard passed too
    stored = records.read_records(tmp_path / "runs" / "records.jsonl")
    assert len(stored) == 1 and stored[0]["num_images"] == 40 and stored[0]["epochs"] == 2
    # Online KD labels every image of both ranks' rows: 2 epochs x 40 images, summed over the ranks.
    assert stored[0]["teacher_forwards"] == 80


@pytest.mark.slow
def test_continual_suite_under_torchrun_records_every_cell_once(tmp_path: Path, monkeypatch):
    """A continual suite under `torchrun --nproc-per-node 2`: the memories are distilled together,
    the cells dealt across the ranks, and rank 0 merges one record per cell, with the keys and
    accuracies of a one-process run."""
    from cdabench import records
    from cdabench.harness.run import run_suite
    from cdabench.harness.suites import load_suite
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    task = tiny_task_file(tmp_path / "tiny.toml", {**SUITE_TASK, "ipcs": [3], "recover.cda.batch_size": 30,
                                                   "posttrain.recipe.batch_size": 30})
    suite = suite_file(tmp_path / "continual.toml", task, base=TINY_CONTINUAL_SUITE, memories=["random", "cda"],
                       unmasked=None, strategies=["naive", "replay"], student="resnet18", retrain_epochs=1)
    one = run_suite(load_suite(str(suite)), tmp_path / "one", device="cpu")
    env = child_env(CDABENCH_CACHE=str(tmp_path / "cache"))
    torchrun = Path(sys.executable).with_name("torchrun")
    multi = _run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cdabench.cli", "run",
                  "--suite", str(suite), "--out", str(tmp_path / "multi"), "--device", "cpu", "--quiet"], env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    stored = records.read_records(tmp_path / "multi" / "records.jsonl")
    assert len(one) >= 4 and sorted(r["cell_key"] for r in stored) == sorted(r["cell_key"] for r in one)
    by_key = {r["cell_key"]: r for r in stored}
    assert [(r["cell"], r["final_accuracy"]) for r in one] == \
        [(by_key[r["cell_key"]]["cell"], by_key[r["cell_key"]]["final_accuracy"]) for r in one]
    assert not list((tmp_path / "multi" / "ranks").rglob("records.jsonl"))
