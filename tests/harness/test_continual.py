"""The continual suite kind: the shipped suite loads and expands, a suite file by path names a
wrong key, a memory larger than the data is refused before any training, and `cdabench run` of a
tiny continual suite resumes after Ctrl-C, records equal memory across sources and feeds the
leaderboard. The protocols themselves are tested in tests/evaluate/continual/."""
from __future__ import annotations

import numpy as np
import pytest

from cdabench import records
from cdabench.cli import main
from cdabench.config import ConfigError, load_task
from cdabench.data import DataError
from cdabench.engine.context import open_context
from cdabench.evaluate.continual.memory import first_per_class, load_memory
from cdabench.evaluate.continual.sequential import SequentialSettings
from cdabench.evaluate.continual.strategies import list_strategies
from cdabench.harness.continual import expand, validate
from cdabench.harness.run import run_suite
from cdabench.harness.suites import load_suite
from cdabench.results.leaderboard import generate
from cdabench.schema import ContinualSuite
from tests.fixtures import (TINY_CONTINUAL_SUITE, interrupt_at, leaderboard_in_subprocess, shuffled_runs, suite_file,
                            tiny_task_file)

# The base tiny task (tests/fixtures.py) with a test_resnet teacher, IPC 3, recover 3 iterations in
# batches of 30 and a post-train recipe of its own.
RECOVER = {"iterations": 3, "batch_size": 30, "jitter": 1}
TASK = {"ipcs": [3], "teacher.model": "test_resnet", "teacher.warmup_epochs": 1, "recover.cda": RECOVER,
        "recover.sre2l": RECOVER, "posttrain.recipe": {"epochs": 2, "batch_size": 20, "optimizer": "adamw", "lr": 0.003}}


def test_memory_larger_than_the_data_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    suite = ContinualSuite(name="x", memories=("random",), ipc=1000, strategies=("naive",))
    with pytest.raises(DataError, match="IPC 1000 is larger than class"):
        run_suite(suite, tmp_path / "run", device="cpu")
    assert not (tmp_path / "cache" / "teachers").exists()       # refused before any training
    with pytest.raises(DataError, match="fewer than the memory's 4 per class"):
        first_per_class(np.array([0, 0, 0, 1, 1, 1, 1]), 4, 2, "folder x")
    assert main(["run", "--suite", "continual", "--steps", "3", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "--steps 3 does not divide the 10 classes" in capsys.readouterr().err
    assert main(["run", "--suite", "continual", "--strategies", "icarl", "--quiet"]) == 2
    assert "excluded" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", "--steps", "5", "--quiet"]) == 2
    assert "continual suites only" in capsys.readouterr().err


def test_the_shipped_suite_loads_and_expands():
    suite = load_suite("continual")
    validate(suite)
    cells = expand(suite)
    assert {c.protocol for c in cells} == {"retrain", "sequential"}
    assert any(c.protocol == "retrain" and c.masked is False for c in cells)
    assert all(c.ipc == load_task(suite.task).ipcs[0] for c in cells)


def test_a_suite_file_by_path_loads_its_sequential_table_and_names_a_wrong_key(tmp_path):
    path = suite_file(tmp_path / "mine.toml", "digits", base=TINY_CONTINUAL_SUITE)
    suite = load_suite(str(path))
    assert suite.name == "mine" and suite.path == str(path)
    assert suite.sequential == SequentialSettings(epochs=1, lr=0.003)
    suite_file(path, "digits", {"sequential.epoch": 2}, base=TINY_CONTINUAL_SUITE)
    with pytest.raises(ConfigError, match=r"mine.toml.sequential: unknown key\(s\) epoch; known keys: .*epochs"):
        load_suite(str(path))


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_continual_suite_end_to_end_resumes_and_feeds_the_leaderboard(tmp_path, monkeypatch):
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    task = tiny_task_file(tmp_path / "tiny.toml", TASK)
    suite_path = suite_file(tmp_path / "tiny-continual.toml", task, base=TINY_CONTINUAL_SUITE)
    out = tmp_path / "run"
    # Killed once two cells are recorded, then resumed by the command line.
    suite = load_suite(str(suite_path))
    with pytest.raises(KeyboardInterrupt), interrupt_at(f"suite {suite.name}", 2):
        run_suite(suite, out, device="cpu")
    assert len(records.read_records(out / "records.jsonl")) == 2
    assert main(["run", "--suite", str(suite_path), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    rows = records.read_records(out / "records.jsonl")
    assert len(rows) == 5 + 10          # retrain 4 memories + 1 unmasked; naive, 4 replays, 3 own buffers, lwf, ewc
    assert len({r["cell_key"] for r in rows}) == len(rows)
    assert main(["run", "--suite", str(suite_path), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert len(records.read_records(out / "records.jsonl")) == 15       # nothing ran again

    for r in rows:
        assert r["kind"] == "continual" and r["steps"] == 5 and len(r["class_order"]) == 10
        assert len(r["accuracy_matrix"]) == 5 and len(r["seen_accuracy"]) == 5
        assert r["top1"] == r["final_accuracy"] == r["seen_accuracy"][-1]
        assert {"forgetting", "bwt", "masked", "protocol", "strategy", "memory", "student"} <= set(r)
        assert not any("Top1_Acc" in key or "/" in key for key in r)          # no Avalanche metric names
    retrain = {(r["memory"], r["masked"]): r for r in rows if r["protocol"] == "retrain"}
    assert set(retrain) == {("random", True), ("herding", True), ("cda", True), ("sre2l", True), ("cda", False)}
    assert retrain[("cda", True)]["label_protocol"] == "online-kd-masked"
    assert retrain[("cda", False)]["label_protocol"] == "online-kd-unmasked"
    sequential = {(r["strategy"], r["memory"]) for r in rows if r["protocol"] == "sequential"}
    assert {s for s, _ in sequential} == set(list_strategies())
    # Equal memory: every source holds ipc images of every class; bytes are recorded per source.
    with_memory = [r for r in rows if r["memory"] in ("random", "herding", "cda", "sre2l")]
    assert {r["num_images"] for r in with_memory} == {3 * 10}
    assert all(r["image_bytes"] > 0 for r in with_memory)
    task_ctx = open_context(load_task(str(task)), None, "cpu", tmp_path / "cache")
    folders = sorted((out / "distilled").iterdir())
    assert len(folders) == 4
    for folder in folders:
        assert load_memory(task_ctx, folder, 3).per_class(10) == [3] * 10
    with pytest.raises(DataError, match="fewer than the memory's 4 per class"):
        load_memory(task_ctx, folders[0], 4)
    tampered = sorted((folders[0] / "images").rglob("*.png"))[0]
    tampered.write_bytes(sorted((folders[0] / "images").rglob("*.png"))[-1].read_bytes())
    with pytest.raises(DataError, match="changed since it was distilled"):
        load_memory(task_ctx, folders[0], 3)

    written = generate([out], tmp_path / "lb")
    names = {p.name for p in written}
    assert "tiny-continual-5steps-ipc3-test_resnet-curves.png" in names
    assert "tiny-continual-5steps-ipc3-test_resnet-matrices.png" in names
    md = (tmp_path / "lb" / "tiny.md").read_text()
    assert "## Continual learning (class-incremental)" in md and "replay · cda" in md
    assert (tmp_path / "lb" / "tiny-continual-5steps-ipc3-test_resnet-curves.png").read_bytes()[:4] == b"\x89PNG"
    # The same page from the same records shuffled, in another process: byte for byte (PNGs too, on one machine).
    shuffled = shuffled_runs(tmp_path / "shuffled", records.read_records(out / "records.jsonl"), seed=0)
    there = leaderboard_in_subprocess(tmp_path / "lb2", shuffled, tmp_path / "mpl")
    assert there == {p.name: p.read_bytes() for p in sorted((tmp_path / "lb").iterdir())}


