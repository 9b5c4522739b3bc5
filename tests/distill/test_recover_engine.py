"""The recover engine (docs/recover.md): parameters drawn up front, K shards per forward, per-shard
BN statistics, the background writer, the deal of unfinished shards and the recorded precision."""
from __future__ import annotations

import copy
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cdabench.distill.bn_loss import BNStatisticsLoss
from cdabench.engine.augment import sample_crop_box
from cdabench.distill.recover import (ImageWriter, RecoverConfig, RecoverForward, freeze, group_shards,
                                      initial_noise, plan_shards, recover_batch, recover_shards, run_recover,
                                      sample_recover_draws)
from cdabench.engine.runtime import ProcessGroup
from cdabench.schema import CropSchedule

from tests.fixtures import REPO, bars_seen, interrupt_at, make_tiny_bn_net

MEAN, STD = (0.5,), (0.25,)
CPU = torch.device("cpu")


def _config(**changes) -> RecoverConfig:
    base = dict(iterations=6, lr=0.25, r_bn=0.01, batch_size=4, jitter=1, crop=CropSchedule("cosine", 1.0))
    base.update(changes)
    return RecoverConfig(**base)


# ------------------------------------------------------------ draws
def _streamed(config: RecoverConfig, seed: int, height: int, width: int):
    """The draws as the loop of earlier versions took them, one iteration at a time."""
    rng = np.random.default_rng(seed)
    boxes, flips, shifts = [], [], []
    for t in range(config.iterations):
        box = (0, 0, height, width)
        if config.crop.crops:
            box = sample_crop_box(rng, height, width, config.crop.scale(t, config.iterations))
        boxes.append(box)
        flips.append(bool(config.flip and rng.random() < 0.5))
        shift = (0, 0)
        if config.jitter > 0:
            low = -config.jitter if config.jitter_symmetric else 0
            shift = tuple(int(v) for v in rng.integers(low, config.jitter + 1, size=2))
        shifts.append(shift)
    return boxes, flips, shifts


@pytest.mark.parametrize("changes", [
    {},                                                              # CDA: cosine curriculum
    {"crop": CropSchedule("fixed"), "jitter_symmetric": True},       # SRe2L, Tiny's symmetric jitter
    {"crop": CropSchedule("none")},                                  # no crop: roll and flip only
    {"crop": CropSchedule("step", 0.5), "flip": False, "jitter": 0},  # crops only
    {"crop": CropSchedule("none"), "flip": False, "jitter": 3},
])
def test_draws_reproduce_the_streamed_order(changes):
    config = _config(iterations=40, **changes)
    for seed in (0, 7, 123456789):
        draws = sample_recover_draws(config, seed, 12, 10)
        boxes, flips, shifts = _streamed(config, seed, 12, 10)
        assert draws.boxes.dtype == torch.int64 and draws.boxes.shape == (40, 4)
        assert draws.flips.dtype == torch.bool and draws.flips.shape == (40,)
        assert draws.shifts.dtype == torch.int64 and draws.shifts.shape == (40, 2)
        assert [tuple(b) for b in draws.boxes.tolist()] == boxes
        assert draws.flips.tolist() == flips
        assert [tuple(s) for s in draws.shifts.tolist()] == shifts
    # The draws are used: some flips, some non-trivial offsets and boxes when enabled.
    if config.flip:
        assert 0 < int(draws.flips.sum()) < 40
    if config.jitter:
        assert draws.shifts.abs().max() > 0


def test_draws_need_a_crop_schedule():
    with pytest.raises(ValueError, match="recover_config"):
        sample_recover_draws(RecoverConfig(crop=None), 0, 8, 8)


def test_initial_noise_is_the_seeded_normal():
    expected = torch.randn((3, 1, 4, 5), generator=torch.Generator().manual_seed(42))
    assert torch.equal(initial_noise(42, 3, (1, 4, 5)), expected)
    assert not torch.equal(initial_noise(43, 3, (1, 4, 5)), expected)


# ---------------------------------------------------- per-shard BN loss
def test_shard_bn_loss_is_each_shards_own_loss():
    torch.manual_seed(0)
    net = make_tiny_bn_net().eval()
    for m in net.modules():   # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    parts = [torch.randn(3, 1, 8, 8) * (k + 1) for k in range(3)]
    with torch.no_grad(), BNStatisticsLoss(net) as single:
        alone = []
        for part in parts:
            net(part)
            alone.append(single.value())
    with torch.no_grad(), BNStatisticsLoss(net, shards=3) as sharded:
        net(torch.cat(parts))
        together = sharded.value()
    assert together.shape == (3,)
    assert torch.allclose(together, torch.stack(alone), rtol=1e-5)
    with torch.no_grad(), BNStatisticsLoss(net, shards=3, fused=True) as fused:
        net(torch.cat(parts))
        assert torch.allclose(fused.value(), together, rtol=1e-5)
    with BNStatisticsLoss(net, shards=2) as bad, pytest.raises(ValueError, match="equal shards"):
        net(torch.randn(3, 1, 8, 8))
        bad.value()


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_statistics_and_gradient_match_fp32_reference(channels_last):
    """bf16 BN inputs take the one-pass fp32-accumulating moments; their values and input
    gradients equal the plain mean / var of the same (bf16-rounded) numbers computed in fp64."""
    from cdabench.distill.bn_loss import shard_statistics

    torch.manual_seed(0)
    x = (torch.randn(6, 5, 7, 4) * 2 + 0.5).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(2, 2, 5)
    x_low = x.clone().requires_grad_(True)
    mean, var = shard_statistics(x_low, 3)      # 3 shards of 2
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (3, 5)
    ((weights[0, :1] * mean[:1]).sum() + (weights[1, 0] * var[0]).sum() + var[1:].sum()).backward()

    x_ref = x.double().requires_grad_(True)
    per = x_ref.unflatten(0, (3, 2))
    ref_mean, ref_var = per.mean(dim=(1, 3, 4)), per.var(dim=(1, 3, 4), unbiased=False)
    ((weights[0, :1].double() * ref_mean[:1]).sum() + (weights[1, 0].double() * ref_var[0]).sum()
     + ref_var[1:].sum()).backward()
    assert torch.allclose(mean.double(), ref_mean, atol=1e-5) and torch.allclose(var.double(), ref_var, rtol=1e-4)
    assert x_low.grad.dtype == torch.bfloat16
    assert torch.allclose(x_low.grad.double(), x_ref.grad, rtol=1e-2, atol=1e-3)   # bf16 rounding of the result


# ------------------------------------------------------- K shards
def test_k_shards_equal_each_shard_alone():
    teacher = freeze(make_tiny_bn_net(num_classes=3))
    labels = [[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 2, 1]]
    seeds = [5, 6, 7]
    for config in (_config(), _config(crop=CropSchedule("fixed"), jitter_symmetric=True)):
        together = recover_shards(teacher, labels, config, seeds, (1, 8, 8), MEAN, STD, CPU)
        assert len(together) == 3
        for (images, stats), ls, seed in zip(together, labels, seeds):
            alone, alone_stats = recover_batch(teacher, ls, config, seed, (1, 8, 8), MEAN, STD, CPU)
            assert images.shape == alone.shape == (4, 1, 8, 8) and images.dtype == torch.uint8
            diff = (images.int() - alone.int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() > 0.95   # float rounding only
            assert stats == pytest.approx(alone_stats, rel=1e-4)
        # The shards differ from each other (each has its own noise and augmentation stream).
        assert not torch.equal(together[0][0], together[1][0])


def test_k_shards_report_per_shard_losses_and_check_sizes():
    teacher = freeze(make_tiny_bn_net(num_classes=3))
    seen = []
    recover_shards(teacher, [[0, 1], [2, 0]], _config(iterations=2), [1, 2], (1, 8, 8), MEAN, STD, CPU,
                   on_step=lambda t, ce, bn: seen.append((t, ce.shape, bn.shape, ce.requires_grad)))
    assert seen == [(0, (2,), (2,), False), (1, (2,), (2,), False)]
    with pytest.raises(ValueError, match="one size"):
        recover_shards(teacher, [[0, 1], [2]], _config(), [1, 2], (1, 8, 8), MEAN, STD, CPU)
    with pytest.raises(ValueError, match="one label list per seed"):
        recover_shards(teacher, [[0, 1]], _config(), [1, 2], (1, 8, 8), MEAN, STD, CPU)
    with pytest.raises(ValueError, match="shards_per_forward"):
        RecoverConfig(shards_per_forward=-1)


def test_group_shards_keeps_sizes_apart():
    shards = plan_shards(250, 2, 100)       # chunks of 100, 100, 50 classes, 2 groups each
    groups = group_shards(shards, 4)
    assert [len(g) for g in groups] == [4, 2]
    assert [len(g[0].labels) for g in groups] == [100, 50]
    assert [s for g in groups for s in g] == shards
    assert [len(g) for g in group_shards(shards, 1)] == [1] * 6
    uneven = plan_shards(3, 5, 6)             # IPC groups (0,1), (2,3), (4,)
    assert [[s.ipc_indices for s in g] for g in group_shards(uneven, 3)] == [[(0, 1), (2, 3)], [(4,)]]


# --------------------------------------------------------- run_recover
def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "images").rglob("*"))
            if p.is_file()}


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image, dtype=np.int64)


def _run_args(config, **changes):
    args = dict(class_folders=["a", "b", "c"], ipc=4, config=config, seed=9, shape=(1, 8, 8), mean=MEAN,
                std=STD, device=CPU)
    args.update(changes)
    return args


def test_run_recover_k_shards_records_and_matches_one_per_forward(tmp_path):
    teacher = make_tiny_bn_net(num_classes=3)
    one = run_recover(teacher, tmp_path / "k1", **_run_args(_config(batch_size=3)))
    two = run_recover(teacher, tmp_path / "k2", **_run_args(_config(batch_size=3, shards_per_forward=2)))
    assert sorted(one) == sorted(two) == [f"c0000_g{g:04d}" for g in range(4)]
    for name in one:
        assert one[name]["shards_per_forward"] == 1 and one[name]["reproducible"] == "bitwise"
        assert two[name]["shards_per_forward"] == 2 and two[name]["reproducible"] == "float"
        assert one[name]["precision"] == two[name]["precision"] == "fp32"
        assert one[name]["device"] == "cpu"
    a, b = _files(tmp_path / "k1"), _files(tmp_path / "k2")
    assert sorted(a) == sorted(b) and len(a) == 12
    for rel in a:
        diff = np.abs(_pixels(a[rel]) - _pixels(b[rel]))
        assert diff.max() <= 1


def test_bf16_recovers_on_cpu_and_records_its_precision(tmp_path, bf16_cpu):
    teacher = make_tiny_bn_net(num_classes=3)
    config = _config(batch_size=3, precision="bf16")
    result = run_recover(teacher, tmp_path / "bf16", **_run_args(config, ipc=1))
    marker = result["c0000_g0000"]
    assert marker["precision"] == "bf16" and all(np.isfinite([marker["final_ce"], marker["final_bn"]]))
    fp32 = run_recover(teacher, tmp_path / "fp32", **_run_args(_config(batch_size=3), ipc=1))
    assert fp32["c0000_g0000"]["precision"] == "fp32"
    # bf16 runs a different arithmetic: the files differ, the BN loss stays close.
    assert _files(tmp_path / "bf16") != _files(tmp_path / "fp32")
    assert marker["final_bn"] == pytest.approx(fp32["c0000_g0000"]["final_bn"], rel=0.05)


class _ThreadGroup(ProcessGroup):
    """Ranks as threads of one process, with a real barrier between them. A rank that dies breaks
    it (`_run_ranks` aborts it), as a torch.distributed collective fails when a peer process
    exits: the others' wait ends on that event, not on a clock. The timeout only bounds a hang."""

    barrier_object: threading.Barrier | None = None

    def barrier(self) -> None:
        type(self).barrier_object.wait(timeout=600)


def _run_ranks(teacher, out, config) -> dict[int, str]:
    """Both ranks of a 2-rank run_recover as threads: {rank: "finished" or the exception's name}."""
    _ThreadGroup.barrier_object = threading.Barrier(2)
    outcome = {}

    def rank(r):
        try:
            run_recover(copy.deepcopy(teacher), out, group=_ThreadGroup(rank=r, world=2), **_run_args(config))
            outcome[r] = "finished"
        except (KeyboardInterrupt, threading.BrokenBarrierError) as exc:
            outcome[r] = type(exc).__name__
            _ThreadGroup.barrier_object.abort()      # this rank is gone: the others' barrier fails
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def test_resumed_run_deals_unfinished_shards_across_ranks(tmp_path):
    """4 shards; a first 2-rank run in which rank 1 is killed in its first shard while rank 0
    finishes its share (shards 0 and 2) and then fails at the barrier that waits for rank 1.
    Dealt after skipping, each rank of the resumed run gets one of the 2 left; dealt before,
    rank 0 would idle and rank 1 would do both."""
    out = tmp_path / "run"
    config = _config(batch_size=3)
    teacher = make_tiny_bn_net(num_classes=3)
    with interrupt_at("recover (rank 1)", 1):
        outcome = _run_ranks(teacher, out, config)
    assert outcome == {0: "BrokenBarrierError", 1: "KeyboardInterrupt"}
    assert sorted(p.stem for p in (out / "shards").glob("*.json")) == ["c0000_g0000", "c0000_g0002"]

    with bars_seen() as bars:
        outcome = _run_ranks(teacher, out, config)
    assert outcome == {0: "finished", 1: "finished"}
    one_shard = (config.iterations, config.iterations)          # (steps done, steps dealt) of each rank
    assert bars == {"recover (rank 0)": one_shard, "recover (rank 1)": one_shard}
    assert sorted(p.stem for p in (out / "shards").glob("*.json")) == [f"c0000_g{g:04d}" for g in range(4)]


def test_image_writer_raises_the_writers_error_and_finishes_queued_work():
    written = []

    def fail():
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        with ImageWriter() as writer:
            writer.submit(written.append, 1)
            writer.submit(fail)
            writer.submit(written.append, 2)
    assert written == [1, 2]   # work queued before and after the failure still ran


def test_gpu_script_dry_run_on_cpu(capsys):
    """benchmarks/gpu_recover.py runs end to end (on a CPU, small) and prints one row per setting."""
    import importlib.util

    path = REPO / "benchmarks" / "gpu_recover.py"
    spec = importlib.util.spec_from_file_location("gpu_recover", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--sizes", "8", "--shards", "1", "2", "--precisions", "fp32",
                        "--warmup", "1", "--steps", "1", "--batch", "4", "--compile-sizes"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["8"]]
    assert [(r[1], r[2], r[3]) for r in rows] == [("1", "fp32", "false"), ("2", "fp32", "false")]
    assert all(float(r[4]) > 0 and float(r[6]) > 0 for r in rows)   # ms per step, projected hours


def test_shards_per_forward_is_not_a_setting_of_the_images():
    """K changes how shards are batched, not what they are: the settings that key a distilled set
    (distill.json, suite.distill_key) are the same for every K."""
    assert _config(shards_per_forward=4).to_dict() == _config().to_dict()
    assert "shards_per_forward" not in _config().to_dict()
    assert _config(precision="bf16").to_dict() != _config(precision="fp32").to_dict()
    assert _config(compile=True).to_dict() == _config().to_dict() and "compile" not in _config().to_dict()


# ------------------------------------------------------ torch.compile of the hooked forward
def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_recover_equals_eager_is_deterministic_and_compiles_once(tmp_path, inductor):
    """`compile = true`: torch.compile (inductor, the real compiler) of the teacher's hooked forward.
    The images equal eager's to float rounding; two runs, each compiling afresh, are byte-identical;
    and run_recover compiles one graph for all its shard groups of one size (the hooks and the
    compiled module are made once per run)."""
    teacher = freeze(make_tiny_bn_net(num_classes=3))
    eager = recover_batch(teacher, [0, 1, 2, 0], _config(), 5, (1, 8, 8), MEAN, STD, CPU)
    compiled = [recover_batch(teacher, [0, 1, 2, 0], _config(compile=True), 5, (1, 8, 8), MEAN, STD, CPU)
                for _ in range(2)]
    assert torch.equal(compiled[0][0], compiled[1][0]) and compiled[0][1] == compiled[1][1]
    assert (compiled[0][0].int() - eager[0].int()).abs().max() <= 1
    assert compiled[0][1] == pytest.approx(eager[1], rel=1e-4)
    # One compiled forward serves K = 1 and then K = 2 (the shard count is a guard: it recompiles
    # rather than reusing the K = 1 graph's statistics).
    labels, seeds = [[0, 1, 2, 0], [2, 2, 1, 0]], [5, 6]
    eager_k2 = recover_shards(teacher, labels, _config(), seeds, (1, 8, 8), MEAN, STD, CPU)
    with RecoverForward(teacher, _config(compile=True), CPU) as forward:
        recover_shards(teacher, labels[:1], _config(compile=True), seeds[:1], (1, 8, 8), MEAN, STD, CPU,
                       forward=forward)
        compiled_k2 = recover_shards(teacher, labels, _config(compile=True), seeds, (1, 8, 8), MEAN, STD, CPU,
                                     forward=forward)
        assert forward.compiled
    for (a, a_stats), (b, b_stats) in zip(compiled_k2, eager_k2):
        assert (a.int() - b.int()).abs().max() <= 1 and a_stats == pytest.approx(b_stats, rel=1e-4)

    torch._dynamo.reset()
    before = _graphs_compiled()
    markers = run_recover(teacher, tmp_path / "compiled", **_run_args(_config(batch_size=3, compile=True)))
    assert _graphs_compiled() - before == 1      # 4 shard groups, one compiled graph
    assert all(m["compiled"] and m["reproducible"] == "bitwise" for m in markers.values())
    plain = run_recover(teacher, tmp_path / "eager", **_run_args(_config(batch_size=3)))
    assert not any(m["compiled"] for m in plain.values())
    a, b = _files(tmp_path / "compiled"), _files(tmp_path / "eager")
    assert sorted(a) == sorted(b) and all(np.abs(_pixels(a[r]) - _pixels(b[r])).max() <= 1 for r in a)


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path):
    """Where compilation fails (here the real inductor pointed at a C++ compiler that does not
    exist, with its caches off), recover warns once, naming the error and the setting, runs eager
    and records that: the files are eager's, byte for byte."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    teacher = make_tiny_bn_net(num_classes=3)
    eager = run_recover(teacher, tmp_path / "eager", **_run_args(_config(batch_size=3), ipc=2))
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), \
            functorch_config.patch(enable_autograd_cache=False), \
            pytest.warns(RuntimeWarning, match="(?s)torch.compile of the recover teacher failed.*compile = false"):
        fallback = run_recover(teacher, tmp_path / "fallback", **_run_args(_config(batch_size=3, compile=True), ipc=2))
    torch._dynamo.reset()
    assert not any(m["compiled"] for m in fallback.values())
    assert _files(tmp_path / "fallback") == _files(tmp_path / "eager")
    assert [m["final_bn"] for m in fallback.values()] == [m["final_bn"] for m in eager.values()]
