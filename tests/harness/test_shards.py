"""Shards of a suite as independent jobs (a Slurm job array): `--stages shared` makes the shared
stages once; shards 1/3, 2/3 and 3/3, separate processes started at different times, record every
cell exactly once, with one process's records; a later plain run merges them; a shard refuses to
start without the shared stages, naming the command that makes them; `--shard slurm` reads the
job array's variables. The rule itself is checked against every order in which shards can start
and finish (harness/shards.py)."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cdabench import records
from cdabench.config import ConfigError
from cdabench.harness.cells import Job, deal_longest_first
from cdabench.harness.run import run_suite
from cdabench.harness.shards import Shard, parse_shard, shard_jobs
from cdabench.harness.suites import load_suite
from tests.fixtures import child_env, run_cli, squeezed, suite_file, tiny_task_file


# ------------------------------------------------------------------------ --shard
def test_shard_numbers_and_the_slurm_array_variables():
    assert parse_shard("2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3" and Shard(2, 3).folder == "shard2of3"
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    # sbatch --array=5-7: the task with ID 7 is the third of three.
    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "7",
             "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard("slurm", array) == Shard(3, 3)
    assert parse_shard("slurm", {**array, "SLURM_ARRAY_TASK_ID": "5"}) == Shard(1, 3)
    assert parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0",
                                 "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(1, 4)   # no MAX: consecutive assumed
    # --array=0-10:2 has six tasks over eleven indices: no shard number from that.
    with pytest.raises(ConfigError, match="not consecutive"):
        parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "10",
                              "SLURM_ARRAY_TASK_COUNT": "6"})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID.*--array"):
        parse_shard("slurm", {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3"})


# ------------------------------------------------------------------------ the rule
def _jobs(n: int) -> list[Job]:
    # Costs with ties, so the deal's tie-breaking is exercised too.
    return [Job(f"k{i}", f"cell{i}", steps=[5, 3, 3, 8, 1, 3, 2][i % 7], run=print) for i in range(n)]


def test_every_cell_once_whatever_the_order_shards_start_and_finish():
    """N shards of one array, each starting after the shards before it recorded some of their
    cells, over a folder that already holds merged records and the file of an earlier array of
    another count: every cell not recorded before is recorded by exactly one shard, whatever the
    order and the head start; a shard started again finds nothing left to run."""
    jobs = _jobs(9)
    settled = {"k0", "k4"}   # records.jsonl, and shards/shard1of2/records.jsonl of a killed 2-shard array
    expected = sorted(j.key for j in jobs if j.key not in settled)
    for count in (2, 3, 4):
        for starts in itertools.permutations(range(1, count + 1)):
            for head_start in range(3):     # cells a shard records before the next one starts
                recorded, pending = [], []
                for index in starts:
                    _, mine = shard_jobs(jobs, Shard(index, count), settled, settled | set(recorded))
                    recorded += [job.key for job in mine[:head_start]]
                    pending += [job.key for job in mine[head_start:]]
                recorded += pending         # the shards finish
                assert sorted(recorded) == expected, (count, starts, head_start)
                for index in starts:
                    assert shard_jobs(jobs, Shard(index, count), settled, settled | set(recorded))[1] == []


def test_dealing_what_is_unrecorded_at_each_start_would_lose_cells():
    """Why the deal skips only what was recorded outside the array: had each shard dealt the cells
    recorded nowhere when it started, shard 2 of 2, starting after shard 1 finished, deals the
    three cells left over two shards and keeps only its part of them: a cell is never run."""
    jobs = _jobs(6)
    first = deal_longest_first(jobs, 2)[0]
    second = deal_longest_first([j for j in jobs if j not in first], 2)[1]
    assert {j.key for j in jobs} - {j.key for j in first + second} == {"k0"}
    # The rule: shard 2 deals as if nothing had been recorded, and runs the rest of the cells.
    _, mine = shard_jobs(jobs, Shard(2, 2), set(), {j.key for j in first})
    assert sorted(j.key for j in first + mine) == sorted(j.key for j in jobs)


# ------------------------------------------------------------------------ end to end
def _suite(folder: Path) -> Path:
    """The tiny suite (CDA and random, random also with hard labels) over two seeds: six cells."""
    return suite_file(folder / "tiny-suite.toml", tiny_task_file(folder / "tiny.toml"), seeds=[0, 1])


def _cli(suite: Path, out: Path, cache: Path, *more: str) -> list[str]:
    return ["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(cache), "--device", "cpu",
            "--workers", "1", "--quiet", *more]


def test_shards_as_separate_processes_give_every_cell_once_and_one_process_records(tmp_path, capsys, private_cache):
    suite = _suite(tmp_path)
    one = run_suite(load_suite(str(suite)), tmp_path / "one", device="cpu", cache=str(private_cache), workers=1)
    assert len(one) == 6

    out = tmp_path / "sharded"
    code, text = run_cli(capsys, _cli(suite, out, private_cache, "--stages", "shared"))
    assert code == 0, text
    assert len(list((out / "distilled").glob("*/manifest.json"))) == 4 and not (out / "records.jsonl").exists()

    argv = [sys.executable, "-m", "cdabench.cli", *_cli(suite, out, private_cache)]
    # Shard 1 runs alone first, so the others start after its cells are recorded; then 2 (as task
    # 1 of `sbatch --array=0-2`) and 3 side by side.
    first = subprocess.run(argv + ["--shard", "1/3"], env=child_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    slurm = child_env(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="2",
                      SLURM_ARRAY_TASK_COUNT="3")
    others = [subprocess.Popen(argv + ["--shard", "slurm"], env=slurm, stderr=subprocess.PIPE, text=True),
              subprocess.Popen(argv + ["--shard", "3/3"], env=child_env(), stderr=subprocess.PIPE, text=True)]
    for proc in others:
        assert proc.wait() == 0, proc.stderr.read()[-3000:]

    files = {i: out / "shards" / f"shard{i}of3" / "records.jsonl" for i in (1, 2, 3)}
    by_shard = {i: records.read_records(path) for i, path in files.items()}
    keys = [r["cell_key"] for rs in by_shard.values() for r in rs]
    assert sorted(keys) == sorted(r["cell_key"] for r in one)          # every cell, each exactly once
    # ... dealt as the harness deals: longest first, over the cells of the one-process plan.
    cost = {r["cell_key"]: r["recipe"]["epochs"] * math.ceil(r["num_images"] / r["recipe"]["batch_size"]) for r in one}
    deal = deal_longest_first([Job(r["cell_key"], r["cell"], cost[r["cell_key"]], print) for r in one], 3)
    assert [sorted(r["cell_key"] for r in by_shard[i]) for i in (1, 2, 3)] == [sorted(j.key for j in d) for d in deal]
    reference = {r["cell_key"]: (r["cell"], r["top1"], r["heldout_top1"]) for r in one}
    assert {r["cell_key"]: (r["cell"], r["top1"], r["heldout_top1"]) for rs in by_shard.values() for r in rs} == reference
    assert not list(out.glob("shards/*/run.lock")) and not (out / "run.lock").exists()   # locks released

    # A shard launched again finds its cells recorded and runs nothing.
    code, text = run_cli(capsys, _cli(suite, out, private_cache, "--shard", "3/3"))
    assert code == 0 and records.read_records(files[3]) == by_shard[3], text

    # A plain run merges the shards' records into records.jsonl and runs nothing itself.
    merged = run_suite(load_suite(str(suite)), out, device="cpu", cache=str(private_cache), workers=1)
    stored = records.read_records(out / "records.jsonl")
    assert sorted(r["record_hash"] for r in stored) == sorted(r["record_hash"] for rs in by_shard.values() for r in rs)
    assert [r["cell"] for r in merged] == [r["cell"] for r in one] and not (out / "shards").exists()


def test_a_shard_without_the_shared_stages_is_refused_with_the_command_that_makes_them(tmp_path, capsys,
                                                                                        private_cache):
    suite, out = _suite(tmp_path), tmp_path / "run"
    empty = tmp_path / "empty-cache"
    code, text = run_cli(capsys, _cli(suite, out, empty, "--shard", "2/3"))
    assert code == 2
    assert "the teacher of task tiny is not in the cache" in text
    stages = squeezed(f"cdabench run --suite {suite} --out {out} --cache-dir {empty} --device cpu --workers 1 "
                      "--quiet --stages shared")
    assert stages in squeezed(text)
    assert not (empty / "teachers").exists()           # no shard trains its own teacher
    # The teacher is there, the distilled sets are not: refused too, naming a set.
    code, text = run_cli(capsys, _cli(suite, out, private_cache, "--shard", "slurm"))
    assert code == 2 and "SLURM_ARRAY_TASK_ID" in text   # not a job array: nothing to read
    code, text = run_cli(capsys, _cli(suite, out, private_cache, "--shard", "1/3"))
    assert code == 2 and "distilled set" in text and "--stages shared" in text
    assert sorted(p.name for p in out.iterdir()) == []   # nothing made, no lock or shard folder left
