"""The suite runner on a tiny task: caching is keyed by what each stage depends on, a re-run of a
finished suite trains nothing, and a killed suite resumes at the first unfinished cell. The task
keeps the base task's teacher, so each test starts from a cache that holds the session's teacher
(conftest.py: `private_cache`) and must train no other."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cdabench import records
from cdabench.harness.run import run_suite
from cdabench.harness.suites import load_suite
from cdabench.schema import Suite
from tests.fixtures import child_env, interrupt_at, one_thread, suite_file, tiny_task_file, wait_for


def write_task(folder: Path, cda_iterations: int = 3, epochs: int = 2) -> str:
    """The base tiny task (tests/fixtures.py) with CDA in batches of 20 and `epochs` of post-train in
    batches of 20."""
    return str(tiny_task_file(folder / "tiny.toml", {
        "recover.sre2l": None, "recover.cda": {"iterations": cda_iterations, "batch_size": 20, "jitter": 1},
        "posttrain.recipe.epochs": epochs, "posttrain.recipe.batch_size": 20}))


def suite_for(task: str) -> Suite:
    """CDA and random real images, random also with hard labels, one seed (tests/fixtures.py: TINY_SUITE)."""
    return load_suite(str(suite_file(Path(task).with_name("tiny-suite.toml"), task)))


def test_caching_resuming_and_reruns(tmp_path: Path, monkeypatch, private_cache):
    monkeypatch.setenv("CDABENCH_CACHE", str(private_cache))
    out = tmp_path / "run"
    task = write_task(tmp_path)
    # Killed once the first cell is recorded: one record, the rest still to do.
    with pytest.raises(KeyboardInterrupt), interrupt_at("suite tiny-suite", 1):
        run_suite(suite_for(task), out, device="cpu")
    assert len(records.read_records(out / "records.jsonl")) == 1
    results = run_suite(suite_for(task), out, device="cpu")
    stored = records.read_records(out / "records.jsonl")
    assert len(results) == 3 and len(stored) == 3          # resumed: the first cell was not redone
    teachers = list((private_cache / "teachers").iterdir())
    assert len(teachers) == 1
    distilled = sorted(p.name for p in (out / "distilled").iterdir())
    assert len(distilled) == 2
    shard_times = {p: p.stat().st_mtime_ns for p in (out / "distilled").rglob("shards/*.json")}

    # A finished suite: nothing runs again.
    run_suite(suite_for(task), out, device="cpu")
    assert len(records.read_records(out / "records.jsonl")) == 3

    # A post-train setting changes: the folder's cells are measured otherwise, so the run stops before
    # any cell and says how to go on, the records untouched; with remeasure every cell is evaluated
    # again, nothing is distilled again, and tables count the new measurements.
    write_task(tmp_path, epochs=3)
    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(records.RecordError, match=r"holds 3 of these cells measured otherwise, e\.g\. cda/ipc2/"
                                                  r"resnet18/soft/seed0: recorded with key \w{12} on cpu:.*--remeasure"):
        run_suite(suite_for(task), out, device="cpu")
    assert (out / "records.jsonl").read_bytes() == before
    remeasured = run_suite(suite_for(task), out, device="cpu", remeasure=True)
    assert len(records.read_records(out / "records.jsonl")) == 6
    kept, left_out = records.unique_cells(records.read_records(out / "records.jsonl"))
    assert [r["record_hash"] for r in kept] == [r["record_hash"] for r in remeasured]
    assert {r["epochs"] for r in kept} == {3} and {r["epochs"] for r in left_out} == {2}
    assert sorted(p.name for p in (out / "distilled").iterdir()) == distilled
    assert {p: p.stat().st_mtime_ns for p in shard_times} == shard_times
    assert len(list((private_cache / "teachers").iterdir())) == 1

    # CDA's recover setting changes: only CDA is distilled and evaluated again; random is untouched.
    write_task(tmp_path, cda_iterations=4, epochs=3)
    run_suite(suite_for(task), out, device="cpu", remeasure=True)
    stored = records.read_records(out / "records.jsonl")
    assert len(stored) == 7 and stored[-1]["method"] == "cda"
    after = sorted(p.name for p in (out / "distilled").iterdir())
    assert len(after) == 3 and set(distilled) < set(after)
    assert len(list((private_cache / "teachers").iterdir())) == 1


def test_worker_processes_give_the_same_records(tmp_path: Path, monkeypatch, private_cache, capsys):
    """`--workers 2` evaluates cells in two spawned processes; each cell's record is the one the
    single-process run writes (same keys, same accuracies), and the parent alone writes
    records.jsonl and the curve files beside it (every cell exactly once; the workers write
    nothing). The progress line estimates the time left. Bit-equal accuracies need one thread in
    every process: this process pins it, and the workers get this process's threads / workers = 1
    (harness/run.py), as their records' device says."""
    monkeypatch.setenv("CDABENCH_CACHE", str(private_cache))
    task = write_task(tmp_path)
    with one_thread():
        one = run_suite(suite_for(task), tmp_path / "one", device="cpu", workers=1)
        capsys.readouterr()
        two = run_suite(suite_for(task), tmp_path / "two", device="cpu", workers=2)
    assert re.search(r"suite tiny-suite: 3/3 \S+, about \d+s left \[", capsys.readouterr().err)
    assert all(r["device"].endswith(" x1 threads") for r in one + two), {r["device"] for r in one + two}
    assert [r["cell"] for r in one] == [r["cell"] for r in two]        # grid order, whoever finished first
    assert [(r["cell_key"], r["top1"], r["heldout_top1"]) for r in one] == \
        [(r["cell_key"], r["top1"], r["heldout_top1"]) for r in two]
    stored = records.read_records(tmp_path / "two" / "records.jsonl")
    assert sorted(r["cell_key"] for r in stored) == sorted(r["cell_key"] for r in two)
    assert all(records.record_id(r) == r["record_hash"] for r in stored)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["curves", "distilled", "records.jsonl"]
    assert sorted(p.name for p in (tmp_path / "two" / "curves").iterdir()) == sorted(f"{r['cell_key']}.json" for r in two)
    assert all(records.read_curve(tmp_path / "two", r)["epochs"][-1]["loss"] == r["final_loss"] for r in stored)
    # A re-run with workers finds everything recorded and starts no process.
    again = run_suite(suite_for(task), tmp_path / "two", device="cpu", workers=2)
    assert [r["record_hash"] for r in again] == [r["record_hash"] for r in two]
    assert len(records.read_records(tmp_path / "two" / "records.jsonl")) == len(stored)


def test_ctrl_c_stops_the_workers_and_a_rerun_finishes(tmp_path: Path, private_cache):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while worker processes
    evaluate cells: the run exits without waiting for them, leaves no process behind, keeps every
    finished record, and the next run finishes the rest with each cell recorded once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    task = write_task(tmp_path, epochs=40)
    suite = suite_file(tmp_path / "tiny-suite.toml", task, methods=["random"], seeds=[0, 1, 2])
    out, env = tmp_path / "run", child_env(CDABENCH_CACHE=str(private_cache), OMP_NUM_THREADS="2")
    argv = [sys.executable, "-m", "cdabench.cli", "run", "--suite", str(suite), "--out", str(out),
            "--device", "cpu", "--workers", "2", "--quiet"]
    # The run starts with Ctrl-C's default action, as a foreground command in a terminal does. A
    # test run launched in the background (`cmd &` in a script, as CI may do) ignores SIGINT, every
    # child inherits that, and Python then installs no KeyboardInterrupt handler: the run would
    # finish all its cells and exit 0, which is what two such runs of this test saw.
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records_path = out / "records.jsonl"
    deadline = time.monotonic() + 300
    while not (records_path.exists() and records_path.read_text().strip()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=60)  # a hang here is the bug this test guards against
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert code != 0, f"the run ended normally before Ctrl-C reached it ({records_path.read_text().count(chr(10))} records)"

    def alive() -> list[str]:
        group = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(proc.pid)], capture_output=True,
                               text=True).stdout
        return [line for line in group.splitlines() if line.split()[1][0] != "Z"]  # zombies: dead, awaiting reaping
    # The workers exit on their own SIGINT; how long that takes depends on the machine's load, so
    # wait for it (a generous deadline: a worker that never exits is the bug), never a fixed sleep.
    assert wait_for(lambda: not alive(), timeout=60), alive()  # no worker left running
    kept = records.read_records(records_path)
    assert 1 <= len(kept) < 6
    # The re-run must use the interrupted run's cache: a teacher retrained elsewhere (at another
    # thread count, say) has another hash, and its soft-label cells other keys.
    results = run_suite(load_suite(str(suite)), out, device="cpu", cache=str(private_cache), workers=1)
    stored = records.read_records(records_path)
    assert len(results) == 6 and sorted(r["cell_key"] for r in stored) == sorted(r["cell_key"] for r in results)
    assert {r["record_hash"] for r in kept} <= {r["record_hash"] for r in results}   # finished cells kept as they were
