"""One run per folder (harness/lock.py): a second launch on a folder in use is refused, naming
the holder; shards of one suite hold their own locks and do not refuse each other, but exclude a
run on the whole folder and shards of another count; a stale lock (same host, its process gone)
is taken over and logged; another host's lock is refused with the file to remove; the lock goes
when the run ends, including by SIGTERM (a scheduler's time limit)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdabench.harness.lock import FolderInUse, FolderLock, lock_path
from cdabench.harness.shards import Shard
from tests.fixtures import child_env, run_cli, squeezed, suite_file, tiny_task_file

# A process that holds a folder's lock until its stdin closes.
HOLDER = """
import sys
from cdabench.harness.lock import FolderLock
with FolderLock(sys.argv[1], "cdabench run --suite held-here"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _suite(folder: Path, **more) -> Path:
    return suite_file(folder / "tiny-suite.toml", tiny_task_file(folder / "tiny.toml", more or None))


def _run(suite: Path, out: Path, cache: Path, *more: str) -> list[str]:
    return ["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(cache), "--device", "cpu",
            "--workers", "1", *more]


def _write_lock(path: Path, **holder) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": "2026-01-01 00:00:00 +0000", "command": "cdabench run --suite old",
                                **holder}))
    return path


def test_a_second_launch_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    suite, out = _suite(tmp_path), tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=child_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for more in ((), ("--shard", "1/2"), ("--stages", "shared")):
            code, text = run_cli(capsys, _run(suite, out, tmp_path / "cache", "--quiet", *more))
            assert code == 2, text
            assert f"held by pid {holder.pid} on {socket.gethostname()}" in text
            assert "cdabench run --suite held-here" in text and "still running on this host" in text
            assert sorted(p.name for p in out.iterdir()) == ["run.lock"]   # refused before doing anything
    finally:
        holder.stdin.close()
        assert holder.wait() == 0
    assert not (out / "run.lock").exists()                                  # released when its run ended
    with FolderLock(out, "next"):
        assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()


def test_shards_of_one_array_share_the_folder_and_exclude_every_other_run(tmp_path):
    out = tmp_path / "run"
    with FolderLock(out, "shard one", Shard(1, 3)), FolderLock(out, "shard two", Shard(2, 3)):
        for other in (None, Shard(1, 4), Shard(1, 3)):       # the whole folder, another array, a shard twice
            with pytest.raises(FolderInUse, match="shard 1/3"):
                with FolderLock(out, "refused", other):
                    pass
        assert sorted(p.parent.name for p in out.glob("shards/*/run.lock")) == ["shard1of3", "shard2of3"]
        assert not (out / "run.lock").exists() and not (out / "shards" / "shard1of4").exists()
    assert not (out / "shards").exists()
    with FolderLock(out, "whole folder"):
        with pytest.raises(FolderInUse, match="whole folder"):
            with FolderLock(out, "shard", Shard(2, 2)):
                pass
    with FolderLock(out, "thirteen", Shard(1, 13)):     # shard1of13 is not a shard of 3
        with pytest.raises(FolderInUse, match="shard 1/13"):
            with FolderLock(out, "three", Shard(2, 3)):
                pass
    assert list(out.iterdir()) == []


def test_a_stale_lock_of_a_dead_pid_is_taken_over_and_logged(tmp_path, capsys, private_cache):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)                                  # that process has exited and been reaped
    suite, out = _suite(tmp_path), tmp_path / "run"
    _write_lock(out / "run.lock", host=socket.gethostname(), pid=dead)
    code, text = run_cli(capsys, _run(suite, out, private_cache, "--methods", "random", "--stages", "shared"))
    assert code == 0, text
    assert f"took over the lock {out / 'run.lock'} of pid {dead}" in text and "no longer running" in text
    assert (out / "distilled").is_dir() and not (out / "run.lock").exists()
    # A pid that runs again, but as another process (reused): its start time differs, so it is stale
    # too; the new lock keeps the one it replaced.
    old = _write_lock(out / "run.lock", host=socket.gethostname(), pid=os.getpid(), process_start=-1)
    stale = json.loads(old.read_text())
    with FolderLock(out, "reuser"):
        assert json.loads(old.read_text())["took_over"] == stale


def test_a_lock_from_another_host_or_unreadable_names_the_file_to_remove(tmp_path, capsys):
    suite, out = _suite(tmp_path), tmp_path / "run"
    lock = _write_lock(lock_path(out, Shard(2, 4)), host="node-elsewhere-17", pid=4242, shard="2/4")
    code, text = run_cli(capsys, _run(suite, out, tmp_path / "cache", "--quiet"))
    assert code == 2
    assert "held by shard 2/4 pid 4242 on node-elsewhere-17" in text and "another host" in text
    assert f"remove{lock}andlaunchagain" in squeezed(text) and lock.exists()    # never removed for you
    lock.unlink()
    (out / "run.lock").write_text("not json")
    code, text = run_cli(capsys, _run(suite, out, tmp_path / "cache", "--quiet", "--shard", "1/2"))
    assert code == 2 and f"remove{out / 'run.lock'}andlaunchagain" in squeezed(text)


def test_sigterm_ends_a_run_and_releases_its_lock(tmp_path, private_cache):
    """Slurm sends SIGTERM at a job's time limit (and on scancel): the run stops as on Ctrl-C and
    its lock goes with it, so the job can be launched again."""
    suite, out = _suite(tmp_path, **{"posttrain.recipe.epochs": 200}), tmp_path / "run"
    argv = [sys.executable, "-m", "cdabench.cli", *_run(suite, out, private_cache, "--quiet")]
    proc = subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "run.lock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, f"exit {code}: the run ended before the signal, or died of it"
    assert not (out / "run.lock").exists()
