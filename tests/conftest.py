"""Shared fixtures: the thread count (set here once for the whole suite), an isolated cache, and
the session's tiny digits task (fixtures.TINY_TASK_TOML) whose teacher is trained once and shared,
through one cache folder, by every test that runs the pipeline on it or on a variant that keeps its
[teacher] table (`private_cache` hands a test a fresh cache that already holds that teacher).

The helpers these fixtures are built on (tiny tasks and suites, tiny networks, interrupts, tiny
datasets) are in fixtures.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cdabench import progress

from tests.fixtures import tiny_task_file

# One intra-op thread for every test, set here and nowhere else (the processes a test starts get
# OMP_NUM_THREADS=1 from fixtures.child_env): on a small shared CPU, two threads that contend with
# another process make the tiny convolutions of these tests up to 100x slower (measured: 0.08 s vs
# 8 s per recover batch).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Nothing a test does may touch ~/.cache: the default cache is a per-test folder."""
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(autouse=True)
def _restore_progress_quiet():
    """`cdabench.cli.main` sets the module-wide quiet flag from --quiet; undo it after each test."""
    before = progress._quiet
    yield
    progress.set_quiet(before)


@pytest.fixture(scope="session")
def tiny_task_path(tmp_path_factory) -> Path:
    return tiny_task_file(tmp_path_factory.mktemp("task") / "tiny.toml")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_task(tiny_task_path):
    from cdabench.config import load_task
    return load_task(str(tiny_task_path))


@pytest.fixture(scope="session")
def tiny_ctx(tiny_task, session_cache):
    from cdabench.engine.context import open_context
    return open_context(tiny_task, None, "cpu", session_cache)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_ctx):
    """The tiny task's teacher, trained once into the session cache (squeeze + class-order guard)."""
    from cdabench.distill.squeeze import get_teacher
    return get_teacher(tiny_ctx)


@pytest.fixture(scope="session")
def cli_common(tiny_task_path, session_cache) -> list[str]:
    """CLI options for the session's task and cache (a command that needs the teacher trains it
    there once; the `tiny_teacher` fixture and every later command reuse it)."""
    return ["--task", str(tiny_task_path), "--cache-dir", str(session_cache), "--device", "cpu", "--quiet"]


@pytest.fixture(scope="session")
def distilled(tmp_path_factory, cli_common):
    """distilled(method, ipc=2, seed=0) -> the --out folder of `cdabench distill`, run once per key."""
    from cdabench.cli import main

    done: dict[tuple, Path] = {}

    def get(method: str, ipc: int = 2, seed: int = 0) -> Path:
        key = (method, ipc, seed)
        if key not in done:
            out = tmp_path_factory.mktemp(f"distilled-{method}-{ipc}-{seed}")
            argv = ["distill", *cli_common, "--method", method, "--seed", str(seed), "--out", str(out)]
            if method != "full":
                argv += ["--ipc", str(ipc)]
            assert main(argv) == 0, f"distill {method} failed"
            done[key] = out
        return done[key]

    return get


@pytest.fixture
def private_cache(tmp_path, session_cache, tiny_teacher) -> Path:
    """A fresh cache folder that already holds the session's trained teacher (and nothing else)."""
    cache = tmp_path / "private-cache"
    shutil.copytree(session_cache / "teachers", cache / "teachers")
    return cache


@pytest.fixture(scope="session")
def digits_set(tiny_ctx):
    """The content every external-format fixture ships (tests/fixtures.py builders): two real fit
    images per digit, class-major, as [0, 1] floats (N, 1, 8, 8), and their labels."""
    from tests.fixtures import class_major_labels
    bank = tiny_ctx.source("fit")
    idx = torch.cat([torch.nonzero(bank.labels == c)[:2, 0] for c in range(10)])
    return bank.images[idx].float() / 255, class_major_labels(10, 2)

