"""`torchrun --nproc-per-node 2` (gloo on CPU) against one process: recover's shards split across
the ranks give exactly the images of one process; both ranks train the teacher and post-train the
student data-parallel; DDP training and the label store equal one process's; suites (cross-arch,
with cell workers, and continual) record every cell once, with one process's keys and accuracies.

Every scenario runs in ONE torchrun launch (tests/torchrun_scenarios.py runs a plan of steps in each
rank), so the start-up of two ranks is paid once; the one-process references run in this process.
The `launched` fixture does both; each test asserts on its share of the outputs. Tasks are the base
tiny task (tests/fixtures.py) with overrides, the teacher timm's test_resnet (the ranks train one
in seconds; what is compared does not depend on the teacher's size)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cdabench import artifacts, records
from cdabench.config import load_task
from cdabench.distill.sets import distill
from cdabench.engine.context import open_context
from cdabench.harness.run import run_suite
from cdabench.harness.suites import load_suite
from tests import torchrun_scenarios
from tests.fixtures import TINY_CONTINUAL_SUITE, child_env, one_thread, suite_file, tiny_task_file

# CDA at IPC 4 in batches of 20: 10 classes x 4 images = two shards, one per rank.
TASK = {"teacher.model": "test_resnet", "ipcs": [4], "recover.cda": {"iterations": 3, "batch_size": 20, "jitter": 1}}
# Suites: IPC 2, post-trained 2 epochs in batches of 20.
SUITE_TASK = {**TASK, "ipcs": [2], "posttrain.recipe.epochs": 2, "posttrain.recipe.batch_size": 20}
# The continual suite: IPC 3, batches of 30; random and CDA memories, naive and replay, test_resnet.
CONTINUAL_TASK = {**SUITE_TASK, "ipcs": [3], "recover.cda.batch_size": 30, "posttrain.recipe.batch_size": 30}
CONTINUAL = {"memories": ["random", "cda"], "unmasked": None, "strategies": ["naive", "replay"], "retrain_epochs": 1}
SCRIPTS = ("hard", "online", "relabel-0", "relabel-3")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch of every scenario, and the one-process references; the paths and results.
    One thread in every process, pinned here (this process by one_thread(), each rank by
    OMP_NUM_THREADS=1 and torchrun_scenarios' set_num_threads(1), each cell worker by the harness's
    threads / workers): the tests compare images, label stores and accuracies across processes bit
    for bit, and a CPU kernel's reduction order follows its thread count."""
    with one_thread():
        yield _launch(tmp_path_factory)


def _launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    cpu = ["--device", "cpu", "--quiet"]
    # The teacher scenario starts from an empty cache; the suites share another, where the
    # one-process suite trains the teacher first.
    fresh_cache, suite_cache = root / "fresh-cache", root / "suite-cache"
    task = tiny_task_file(root / "tasks" / "tiny.toml", TASK)
    suite = suite_file(root / "suite.toml", tiny_task_file(root / "suite-task" / "tiny.toml", SUITE_TASK), seeds=[0, 1])
    continual = suite_file(root / "continual.toml", tiny_task_file(root / "continual-task" / "tiny.toml", CONTINUAL_TASK),
                           CONTINUAL, base=TINY_CONTINUAL_SUITE)
    r = SimpleNamespace(root=root, fresh_cache=fresh_cache)

    # Before the launch: the one-process suite, and three of its records planted as earlier runs
    # with other rank counts would leave them: a killed one-process run had recorded cell 0; a
    # killed 3-rank run's ranks 1 and 2 had finished cells 2 and 4, and rank 0 never merged them.
    # The 2-rank launch resumes that folder (README: "with any number of ranks").
    r.one = run_suite(load_suite(str(suite)), root / "one", device="cpu", cache=str(suite_cache), workers=1)
    r.planted = [records.append_record(root / "multi/records.jsonl", r.one[0]),
                 records.append_record(root / "multi/ranks/rank1/records.jsonl", r.one[2]),
                 records.append_record(root / "multi/ranks/rank2/records.jsonl", r.one[4])]
    r.suite, r.suite_cache = suite, suite_cache

    plan = [{"script": kind, "out": str(root / f"two-{kind}")} for kind in SCRIPTS]
    plan += [
        # Both ranks train the teacher (DDP) and recover their shards; then post-train data-parallel.
        {"cli": ["distill", "--task", str(task), "--cache-dir", str(fresh_cache), *cpu, "--method", "cda",
                 "--ipc", "4", "--out", str(root / "d")]},
        {"cli": ["evaluate", "--task", str(task), "--cache-dir", str(fresh_cache), *cpu, "--data", str(root / "d"),
                 "--epochs", "2", "--out", str(root / "runs")]},
        # The suite with two cell workers per rank, resuming the killed run; a snapshot of its
        # records; the same suite again (it must find every cell recorded and write nothing).
        # (Not --quiet: its progress lines are checked.)
        {"cli": ["run", "--suite", str(suite), "--out", str(root / "multi"), "--cache-dir", str(suite_cache),
                 "--device", "cpu", "--workers", "2"]},
        {"copy": [str(root / "multi" / "records.jsonl"), str(root / "multi-after-first-run.jsonl")]},
        {"cli": ["run", "--suite", str(suite), "--out", str(root / "multi"), "--cache-dir", str(suite_cache), *cpu]},
        {"cli": ["run", "--suite", str(continual), "--out", str(root / "continual-multi"),
                 "--cache-dir", str(suite_cache), *cpu]},
    ]
    (root / "plan.json").write_text(json.dumps(plan, indent=1))
    # `python -m torch.distributed.run` is the `torchrun` command (its console script), found in any
    # environment that imports torch, also one whose packages come from another (no script there).
    r.launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(Path(torchrun_scenarios.__file__)), str(root / "plan.json")],
                              env=child_env(CDABENCH_CACHE=str(root / "default-cache"), OMP_NUM_THREADS="1"),
                              capture_output=True, text=True,
                              timeout=600)

    # After the launch: the one-process references of the other scenarios.
    if r.launch.returncode == 0:  # the teacher the ranks trained recovers the one-process set too
        ctx = open_context(load_task(str(task)), None, "cpu", fresh_cache)
        distill(ctx, "cda", 4, 0, root / "single")
    for kind in SCRIPTS:
        torchrun_scenarios.run_script(kind, str(root / f"one-{kind}"))
    r.continual_one = run_suite(load_suite(str(continual)), root / "continual-one", device="cpu", cache=str(suite_cache))
    return r


@pytest.fixture
def ran(launched):
    """The launch's outputs, once it has succeeded (else its last words)."""
    assert launched.launch.returncode == 0, launched.launch.stderr[-5000:]
    return launched


@pytest.mark.slow
def test_torchrun_splits_shards_and_matches_single_process(ran):
    one = artifacts.read_json(ran.root / "single" / "manifest.json")
    two = artifacts.read_json(ran.root / "d" / "manifest.json")
    # 10 classes x 4 IPC at 20 per batch: 2 shards, one per rank; same images, byte for byte.
    assert len(list((ran.root / "d" / "shards").glob("*.json"))) == 2
    assert len(two["files"]) == 40
    assert two["files"] == one["files"] and two["images_hash"] == one["images_hash"]
    for rel, digest in two["files"].items():
        assert artifacts.sha256_file(ran.root / "d" / "images" / rel) == digest


@pytest.mark.slow
def test_suite_under_torchrun_records_every_cell_once_like_one_process(ran):
    """`cdabench run` under `torchrun --nproc-per-node 2` (gloo), each rank with 2 spawned cell
    workers: the workers do not join (and hang) the ranks' process group; resuming a folder that
    killed runs of 1 and 3 ranks left (records in records.jsonl and in ranks 1 and 2's files, not
    merged yet) skips their finished cells; every cell is recorded exactly once, with the
    single-process run's cell keys and accuracies (one thread everywhere)."""
    one = ran.one
    assert len(one) == 6
    stored = records.read_records(ran.root / "multi-after-first-run.jsonl")
    assert sorted(r["cell_key"] for r in stored) == sorted(r["cell_key"] for r in one)  # every cell, once
    for planted in ran.planted:   # kept as the earlier runs recorded them, not run again
        assert [r["record_hash"] for r in stored if r["cell_key"] == planted["cell_key"]] == [planted["record_hash"]]
    by_key = {r["cell_key"]: r for r in stored}
    assert {r["device"].split(" x")[-1] for r in one + stored} == {"1 threads"}   # pinned everywhere
    fields = ("cell", "top1", "heldout_top1", "final_loss", "hashes")
    assert [[r[f] for f in fields] for r in one] == [[by_key[r["cell_key"]][f] for f in fields] for r in one]
    assert not list((ran.root / "multi" / "ranks").rglob("records.jsonl"))  # merged and removed
    # The re-run under torchrun found every cell recorded and wrote nothing.
    assert records.read_records(ran.root / "multi" / "records.jsonl") == stored
    # Each rank shows its own progress; only rank 0 estimates the time left.
    text = ran.launch.stderr
    shown = "\n".join(re.findall(r"suite suite \(rank \d\): [^\[]*\[", text))
    assert re.search(r"suite suite \(rank 0\): \d+/\d+ \S+, (about \S+|estimating the time) left \[", text), shown
    assert re.search(r"suite suite \(rank 1\): \d+/\d+ \S+ \[", text), shown
    assert not re.search(r"suite suite \(rank 1\): [^\[]* left \[", text), shown


@pytest.mark.slow
def test_a_killed_two_rank_suite_resumes_in_one_process(ran, tmp_path):
    """The reverse change of rank count: what a killed 2-rank suite leaves (each rank's records,
    none merged, no records.jsonl) resumed by one plain process: it merges both ranks' records,
    runs only the cell neither had finished, and records every cell once."""
    stored = records.read_records(ran.root / "multi-after-first-run.jsonl")
    out = tmp_path / "resumed"
    shutil.copytree(ran.root / "one" / "distilled", out / "distilled")   # the sets: not what is tested here
    left = stored[:3], stored[3:5]                                        # stored[5]: the unfinished cell
    for rank, part in enumerate(left):
        for record in part:
            records.append_record(out / "ranks" / f"rank{rank}" / "records.jsonl", record)
    with one_thread():
        resumed = run_suite(load_suite(str(ran.suite)), out, device="cpu", cache=str(ran.suite_cache), workers=1)
    final = records.read_records(out / "records.jsonl")
    assert sorted(r["cell_key"] for r in final) == sorted(r["cell_key"] for r in stored)   # every cell, once
    assert not list((out / "ranks").rglob("records.jsonl"))                             # merged and removed
    by_key = {r["cell_key"]: r for r in final}
    assert [by_key[r["cell_key"]]["record_hash"] for r in stored[:5]] == [r["record_hash"] for r in stored[:5]]
    rerun = by_key[stored[5]["cell_key"]]                                  # the one cell run here
    assert (rerun["top1"], rerun["heldout_top1"]) == (stored[5]["top1"], stored[5]["heldout_top1"])
    assert [r["cell_key"] for r in resumed] == [r["cell_key"] for r in ran.one]


# --- data-parallel training ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("labels", ["hard", "online"])
def test_ddp_training_matches_one_process_on_the_same_global_batch(ran, labels: str):
    """Two gloo ranks, each with its share of every global batch (5/5 and 2/1 images), train a
    BN-free CNN to the weights one process reaches: the same order, views, CutMix partners and
    online-KD targets, the same steps and schedule, the loss weighted by each rank's share.
    What differs is the order of floating-point sums (gradient all-reduce): 1e-5 relative."""
    one = torch.load(ran.root / f"one-{labels}", weights_only=True)
    two = torch.load(ran.root / f"two-{labels}", weights_only=True)
    for name, weight in one["state"].items():
        torch.testing.assert_close(two["state"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    assert int(two["teacher_forwards"]) == int(one["teacher_forwards"]) == (69 if labels == "online" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("topk", [0, 3])
def test_two_rank_relabel_equals_one_rank_byte_for_byte(ran, topk: int):
    """The label store's epochs dealt over two gloo ranks: the same epoch files, byte for byte,
    and the same manifest hash as one process; rank 0 alone writes the manifest."""
    one_dir, two_dir = ran.root / f"one-relabel-{topk}", ran.root / f"two-relabel-{topk}"
    one, two = artifacts.read_json(one_dir / "labels.json"), artifacts.read_json(two_dir / "labels.json")
    assert sorted(p.name for p in two_dir.iterdir()) == \
        ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "epoch_0004.pt", "labels.json"]
    for name in one["files"]:
        assert (two_dir / name).read_bytes() == (one_dir / name).read_bytes(), name
    assert two["label_hash"] == one["label_hash"] and two["label_bytes"] == one["label_bytes"]
    assert two["teacher_forwards"] == one["teacher_forwards"] == 5 * 23


@pytest.mark.slow
def test_torchrun_trains_the_teacher_and_post_trains_data_parallel_writing_one_record(ran):
    """`cdabench distill` then `cdabench evaluate` under torchrun with an empty cache: both ranks
    train the teacher (DDP; rank 0 saves it), recover their shards, post-train the student
    data-parallel with online KD, and rank 0 alone appends the one record."""
    (teacher,) = (ran.fresh_cache / "teachers").glob("*/teacher.json")
    teacher_info = artifacts.read_json(teacher)
    assert teacher_info["ranks"] == 2 and teacher_info["heldout_top1"] >= 50.0  # the guard passed too
    stored = records.read_records(ran.root / "runs" / "records.jsonl")
    assert len(stored) == 1 and stored[0]["num_images"] == 40 and stored[0]["epochs"] == 2
    # Online KD labels every image of both ranks' rows: 2 epochs x 40 images, summed over the ranks.
    assert stored[0]["teacher_forwards"] == 80


@pytest.mark.slow
def test_continual_suite_under_torchrun_records_every_cell_once(ran):
    """A continual suite under `torchrun --nproc-per-node 2`: the memories are distilled together,
    the cells dealt across the ranks, and rank 0 merges one record per cell, with the keys and
    accuracies of a one-process run."""
    one = ran.continual_one
    stored = records.read_records(ran.root / "continual-multi" / "records.jsonl")
    assert len(one) >= 4 and sorted(r["cell_key"] for r in stored) == sorted(r["cell_key"] for r in one)
    by_key = {r["cell_key"]: r for r in stored}
    assert [(r["cell"], r["final_accuracy"]) for r in one] == \
        [(by_key[r["cell_key"]]["cell"], by_key[r["cell_key"]]["final_accuracy"]) for r in one]
    assert not list((ran.root / "continual-multi" / "ranks").rglob("records.jsonl"))
