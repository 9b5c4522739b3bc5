"""A `cdabench` process killed with SIGKILL in the middle of writing a file resumes when the same
command runs again, and ends with what an uninterrupted run writes, byte for byte.

The kills are real: the `cdabench` command runs as a subprocess whose Python loads the test-only
tests/killpoints/sitecustomize.py, which cuts the temporary file of a named write to half its
bytes and sends the process SIGKILL before the file is moved into place (what the disk holds
after `kill -9` or a power cut during the write). Killed at: an image of a recover shard, a
shard's marker, the distilled set's manifest, an epoch of the FKD label store, and records.jsonl.
The in-process Ctrl-C of a stage is tested beside each stage (tests/harness/test_run.py,
tests/distill/test_recover_engine.py); this is the crash no handler runs for.

Every process runs one thread (child_env; `one_thread` here): the resumed outputs are compared
with this process's uninterrupted run bit for bit."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cdabench import artifacts, records
from cdabench.cli import main
from cdabench.harness.run import run_suite
from cdabench.harness.suites import load_suite
from tests.fixtures import REPO, child_env, one_thread, suite_file, tiny_task_file

KILLPOINTS = Path(__file__).resolve().parent / "killpoints"


def cdabench_command() -> list[str]:
    """The installed `cdabench` command of this environment (its console script)."""
    script = Path(sys.executable).with_name("cdabench")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cdabench.cli"]


def cdabench(argv: list[str], cwd: Path, kill_at: str | None = None, nth: int = 1) -> subprocess.CompletedProcess:
    """Run `cdabench argv`; with `kill_at`, killed mid-write of the nth file matching that pattern."""
    env = child_env(PYTHONPATH=os.pathsep.join([str(KILLPOINTS), str(REPO)]))
    env.pop("CDABENCH_TEST_KILL_AT", None)
    if kill_at:
        env.update(CDABENCH_TEST_KILL_AT=kill_at, CDABENCH_TEST_KILL_NTH=str(nth))
    done = subprocess.run([*cdabench_command(), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if kill_at:
        assert done.returncode == -signal.SIGKILL, \
            f"expected a kill at {kill_at} (#{nth}), got exit {done.returncode}: {done.stderr[-3000:]}"
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def half_written(folder: Path, name: str) -> list[Path]:
    """The temporary files atomic_write_bytes left for `name` in `folder` (a kill mid-write)."""
    return sorted(folder.glob(f".{name}.*.tmp"))


def files_under(folder: Path) -> dict[str, bytes]:
    """Every finished file under `folder` (temporary files left by a kill excluded), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")}


@pytest.mark.slow
def test_distill_killed_in_a_shard_a_marker_and_the_manifest_resumes_to_the_same_set(tmp_path, private_cache):
    """CDA at IPC 2 in shards of 5 images (4 shards: classes 0-4 and 5-9, IPC slot 0 then 1),
    killed three times, each run resuming the last: while writing the first image of IPC slot 1,
    while writing the last shard's marker (its images all written), while writing the manifest."""
    task = tiny_task_file(tmp_path / "tiny.toml", {"recover.sre2l": None, "recover.cda.batch_size": 5})
    out = tmp_path / "killed"
    argv = ["distill", "--task", str(task), "--cache-dir", str(private_cache), "--device", "cpu", "--quiet",
            "--method", "cda", "--ipc", "2", "--out", str(out)]

    cdabench(argv, tmp_path, kill_at="*/images/*/ipc0001.png")
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == ["c0000_g0000.json"]
    assert len(list((out / "images").rglob(".ipc0001.png.*.tmp"))) == 1       # the half-written image
    assert not list((out / "images").rglob("ipc0001.png")) and not (out / "manifest.json").exists()
    first_marker = (out / "shards" / "c0000_g0000.json").read_bytes()

    cdabench(argv, tmp_path, kill_at="*/shards/c0001_g0001.json")
    assert not (out / "shards" / "c0001_g0001.json").exists() and half_written(out / "shards", "c0001_g0001.json")
    assert len(list((out / "images").rglob("ipc0001.png"))) == 10              # its images were all written

    cdabench(argv, tmp_path, kill_at="*/manifest.json")
    assert len(list((out / "shards").glob("*.json"))) == 4
    assert not (out / "manifest.json").exists() and half_written(out, "manifest.json")

    cdabench(argv, tmp_path)
    with one_thread():                                                          # the uninterrupted run, here
        assert main([*argv[:-1], str(tmp_path / "whole")]) == 0
    killed, whole = (artifacts.read_json(p / "manifest.json") for p in (out, tmp_path / "whole"))
    assert killed["files"] == whole["files"] and killed["images_hash"] == whole["images_hash"]
    assert files_under(out / "images") == files_under(tmp_path / "whole" / "images")
    assert (out / "shards" / "c0000_g0000.json").read_bytes() == first_marker   # finished shards were not redone
    # The set the resumed run recorded is readable and is the one evaluated (its hashes checked on load).
    assert main(["evaluate", "--task", str(task), "--cache-dir", str(private_cache), "--device", "cpu", "--quiet",
                 "--data", str(out), "--labels", "hard", "--epochs", "1", "--out", str(tmp_path / "runs")]) == 0


@pytest.mark.slow
def test_a_suite_killed_in_a_label_store_epoch_and_in_records_jsonl_resumes_to_the_same_records(
        tmp_path, private_cache):
    """Random real images under stored soft labels (an FKD label store of 2 epochs) and under hard
    labels: killed while writing the store's second epoch, then while appending the second record;
    the third run finishes. The store is byte for byte the uninterrupted one, every cell is recorded
    once, and the first record is kept as it was written."""
    task = tiny_task_file(tmp_path / "tiny.toml", {"posttrain.kd.mode": "stored"})
    suite = suite_file(tmp_path / "tiny-suite.toml", task, methods=["random"])
    killed_cache = tmp_path / "killed-cache"
    shutil.copytree(private_cache, killed_cache)
    out = tmp_path / "killed"
    argv = ["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(killed_cache), "--device", "cpu",
            "--workers", "1", "--quiet"]

    cdabench(argv, tmp_path, kill_at="*/epoch_0001.pt")
    (store,) = (killed_cache / "labels").iterdir()
    assert sorted(p.name for p in store.iterdir() if not p.name.endswith(".tmp")) == ["epoch_0000.pt"]
    assert half_written(store, "epoch_0001.pt") and not (out / "records.jsonl").exists()

    cdabench(argv, tmp_path, kill_at="*/records.jsonl", nth=2)
    first = (out / "records.jsonl").read_bytes()
    assert len(records.read_records(out / "records.jsonl")) == 1 and half_written(out, "records.jsonl")

    cdabench(argv, tmp_path)
    stored = records.read_records(out / "records.jsonl")
    assert (out / "records.jsonl").read_bytes().startswith(first)             # the first record as written
    whole_cache = tmp_path / "whole-cache"
    shutil.copytree(private_cache, whole_cache)
    with one_thread():
        whole = run_suite(load_suite(str(suite)), tmp_path / "whole", device="cpu", cache=str(whole_cache), workers=1)
    assert sorted(r["cell_key"] for r in stored) == sorted(r["cell_key"] for r in whole)   # every cell, once
    by_key = {r["cell_key"]: r for r in stored}
    assert [(by_key[r["cell_key"]]["top1"], by_key[r["cell_key"]]["hashes"]) for r in whole] == \
        [(r["top1"], r["hashes"]) for r in whole]
    (whole_store,) = (whole_cache / "labels").iterdir()
    assert store.name == whole_store.name                                     # the same store key
    epochs = {name: data for name, data in files_under(store).items() if name.startswith("epoch_")}
    assert sorted(epochs) == ["epoch_0000.pt", "epoch_0001.pt"]
    assert epochs == {name: data for name, data in files_under(whole_store).items() if name.startswith("epoch_")}
    assert json.loads((store / "labels.json").read_text())["label_hash"] == \
        json.loads((whole_store / "labels.json").read_text())["label_hash"]
