"""Shared fixtures: the thread count (set here once for the whole suite), an isolated cache, and
the session's tiny digits task (fixtures.TINY_TASK_TOML) whose teacher is trained once and shared,
through one cache folder, by every test that runs the pipeline on it or on a variant that keeps its
[teacher] table (`private_cache` hands a test a fresh cache that already holds that teacher).

The helpers these fixtures are built on (tiny tasks and suites, tiny networks, interrupts, tiny
datasets) are in fixtures.py.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from cdabench import progress
from cdabench.engine import runtime

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


# bf16 on a CPU. "native": where the CPU has native bf16 (runtime.bf16_supported: oneDNN's
# AVX-512 BF16 / AMX kernels), the run every user gets; elsewhere skipped, and the skip reason and a
# warning say what was not checked. "emulated": where the CPU has no native bf16 (most CI runners),
# the one function that decides the capability says yes, so the same bf16 code runs on torch's
# emulated bf16 kernels (exact bf16 rounding, 20-40x slower than fp32: small networks only);
# skipped where the native run ran. Either way the bf16 code runs on every machine.
@pytest.fixture
def native_bf16(request) -> None:
    if not runtime.bf16_supported(torch.device("cpu")):
        what = f"{request.node.name} on native bf16 kernels (oneDNN AVX-512 BF16 / AMX)"
        warnings.warn(f"not checked on this CPU, which has no native bf16: {what}; its emulated-bf16 variant ran",
                      UserWarning)
        pytest.skip(f"this CPU has no native bf16: {what} not checked (its emulated variant ran)")


@pytest.fixture
def emulated_bf16(monkeypatch) -> None:
    if runtime.bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has native bf16: the native variant ran these checks")
    decide = runtime.bf16_supported
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: device.type == "cpu" or decide(device))


@pytest.fixture(params=["native", "emulated"])
def bf16_cpu(request) -> str:
    """Both variants of a bf16 test that is cheap enough to run on emulated bf16 as it is."""
    request.getfixturevalue(f"{request.param}_bf16")
    return request.param


@pytest.fixture(scope="session")
def _inductor_error() -> str | None:
    """Why torch.compile (inductor and the C++ compiler behind it) cannot compile recover's hooked
    teacher forward and backward on this machine (RecoverForward's own warning), or None when it can."""
    from cdabench.distill.recover import RecoverConfig, RecoverForward, freeze
    from cdabench.schema import CropSchedule
    from tests.fixtures import make_tiny_bn_net
    config = RecoverConfig(iterations=1, lr=0.25, r_bn=0.01, batch_size=4, crop=CropSchedule("none"), compile=True)
    with warnings.catch_warnings(record=True) as caught, \
            RecoverForward(freeze(make_tiny_bn_net()), config, torch.device("cpu")) as forward:
        warnings.simplefilter("always")
        forward(torch.rand(4, 1, 8, 8, requires_grad=True), 1)
    torch._dynamo.reset()
    if forward.compiled:
        return None
    return " ".join(str(w.message) for w in caught)[:300] or "it fell back to eager"


@pytest.fixture
def inductor(request, _inductor_error) -> None:
    """A test of the compiled path (`compile = true`) runs where torch.compile works here; elsewhere
    it is skipped, and the skip reason and a warning say what was not checked (the product then
    runs eager, which tests/distill/test_recover_engine.py checks: compile failure falls back)."""
    if _inductor_error is not None:
        what = f"{request.node.name} (the compiled path)"
        warnings.warn(f"not checked here, torch.compile fails on this machine ({_inductor_error}): {what}",
                      UserWarning)
        pytest.skip(f"torch.compile fails on this machine ({_inductor_error}): {what} not checked")


@pytest.fixture(scope="session")
def digits_set(tiny_ctx):
    """The content every external-format fixture ships (tests/fixtures.py builders): two real fit
    images per digit, class-major, as [0, 1] floats (N, 1, 8, 8), and their labels."""
    from tests.fixtures import class_major_labels
    bank = tiny_ctx.source("fit")
    idx = torch.cat([torch.nonzero(bank.labels == c)[:2, 0] for c in range(10)])
    return bank.images[idx].float() / 255, class_major_labels(10, 2)
