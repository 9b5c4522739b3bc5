"""The runtime: autocast follows the precision (fp32 or bf16, on CPU too); a process started by
torchrun finds its device and its workers shed torchrun's environment."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cdabench.engine.labels import HardLabels
from cdabench.engine.models import create_model
from cdabench.engine.runtime import autocast, check_precision, has_depthwise_conv, prepare_model
from cdabench.engine.train import ImageBank, Normalizer, make_optimizer, train_step
from cdabench.schema import AugmentSpec, TrainRecipe
from tests.fixtures import child_env

CPU = torch.device("cpu")


def test_autocast_follows_the_precision_on_cpu():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="use fp32 or bf16"):
        check_precision("fp16", CPU)


def test_workers_strip_torchruns_environment():
    from cdabench.engine.runtime import strip_launcher_env
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500", "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1"}
    removed = strip_launcher_env(env)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1"}
    assert len(removed) == 9


@pytest.mark.parametrize("local_rank, visible, index", [
    (None, 1, 0), (None, 8, 0),      # plain process: the first visible device
    (3, 8, 3), (0, 2, 0), (1, 2, 1),  # torchrun shows every GPU of the node: LOCAL_RANK picks one
    (3, 1, 0), (7, 1, 0),            # the launcher shows one GPU per task: that one, whatever LOCAL_RANK says
])
def test_device_from_local_rank_only_when_that_many_are_visible(local_rank, visible, index):
    from cdabench.engine.runtime import local_device_index
    assert local_device_index(local_rank, visible) == index


def test_more_ranks_than_visible_gpus_is_refused():
    from cdabench.engine.runtime import local_device_index
    with pytest.raises(RuntimeError, match="LOCAL_RANK is 2 but only 2 CUDA devices"):
        local_device_index(2, 2)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        local_device_index(0, 0)


def test_cpu_workers_share_the_cpu():
    import torch

    from cdabench.engine.runtime import worker_devices
    assert worker_devices(torch.device("cpu"), 3) == ["cpu", "cpu", "cpu"]
    assert worker_devices(torch.device("cpu"), 2, world=4) == ["cpu", "cpu"]


def test_bf16_is_refused_on_a_cpu_without_native_bf16(tmp_path):
    """`cdabench distill --precision bf16` on a CPU without native bf16 stops before any work, with
    the fix. The capability is what oneDNN reports (runtime.bf16_supported), and oneDNN held to
    AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) reports none on any x86 CPU: the product's own decision on a
    CPU that lacks the instructions, nothing mocked."""
    env = child_env(ONEDNN_MAX_CPU_ISA="AVX2", CDABENCH_CACHE=str(tmp_path / "cache"))
    probe = subprocess.run([sys.executable, "-c", "import torch; from cdabench.engine.runtime import bf16_supported; "
                            "print(bf16_supported(torch.device('cpu')))"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    if probe.stdout.strip() != "False":
        pytest.skip("oneDNN on this CPU reports native bf16 even held to AVX2 (not x86?): the refusal is not checked")
    out = tmp_path / "set"
    done = subprocess.run([sys.executable, "-m", "cdabench.cli", "distill", "--precision", "bf16", "--method", "random",
                           "--ipc", "1", "--device", "cpu", "--quiet", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    message = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--precision bf16 was asked for, but cpu:" in message and "has no native bf16" in message
    assert "use --precision fp32" in message
    assert not out.exists() and not (tmp_path / "cache").exists()       # refused before any work


def test_channels_last_on_cpu_only_for_models_with_depthwise_convolutions():
    """prepare_model: MobileNetV2 (depthwise convolutions) goes channels-last on a CPU, where its
    oneDNN kernels are faster so; a ResNet and the ViT stay contiguous. The layout is a float
    path, not other arithmetic: the outputs agree to rounding."""
    for name, depthwise in [("mobilenetv2_035", True), ("resnet18_w16", False), ("deit_w64", False)]:
        torch.manual_seed(0)
        model = create_model(name, 10, 1, 8, patch_size=4 if name == "deit_w64" else None).eval()
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            expected = model(x)
        prepared = prepare_model(model, CPU)
        assert has_depthwise_conv(prepared) is depthwise
        # The layout shows in the activations (every MobileNetV2 weight is 1x1 or one channel a group,
        # which both layouts share): the convolutions' outputs of more than one channel and pixel.
        outputs = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                 for m in prepared.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            torch.testing.assert_close(prepared(x), expected, rtol=1e-4, atol=1e-5)
        for hook in hooks:
            hook.remove()
        maps = [out for out in outputs if out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1]
        assert maps and all(out.is_contiguous(memory_format=torch.channels_last) is depthwise
                            and out.is_contiguous() is not depthwise for out in maps), name


def test_channels_last_training_step_matches_the_default_layout():
    """A first post-train step of MobileNetV2-0.35 (train-mode BN, hard labels, batch 25, 8 px) gives
    the same loss in channels-last as in the default layout, to rounding: another float path only."""
    bank = ImageBank(torch.randint(0, 256, (25, 1, 8, 8), dtype=torch.uint8), torch.arange(25) % 10)
    x, y, idx = next(bank.batches(np.arange(25), 25))
    labels, normalizer = HardLabels(AugmentSpec(crop="none", flip=False), 8), Normalizer((0.3,), (0.37,), CPU)
    losses = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        student = create_model("mobilenetv2_035", 10, 1, 8)
        student = prepare_model(student, CPU) if channels_last else student
        optimizer = make_optimizer(student, TrainRecipe(optimizer="adamw", lr=0.01, weight_decay=0.01))
        losses.append(train_step(student, optimizer, labels, normalizer, CPU, x, y, idx, 0,
                                 np.random.default_rng(0), bank).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_a_cpu_record_names_the_float_path_it_was_measured_on():
    """A record's device names what draws another float path on a CPU: ATen's kernel capability (which
    ATEN_CPU_CAPABILITY caps), oneDNN's ISA cap where ONEDNN_MAX_CPU_ISA sets one, and the threads."""
    code = ("import torch; from cdabench.engine.runtime import device_description; "
            "print(device_description(torch.device('cpu')))")
    capped = subprocess.run([sys.executable, "-c", code], env=child_env(ATEN_CPU_CAPABILITY="default",
                            ONEDNN_MAX_CPU_ISA="AVX2"), capture_output=True, text=True, check=True).stdout.strip()
    assert capped.startswith("cpu:") and capped.endswith(" DEFAULT oneDNN<=AVX2 x1 threads"), capped
    env = child_env(ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="2")
    env.pop("ONEDNN_MAX_CPU_ISA", None)   # no cap set: none named
    two = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert two.strip().endswith(" DEFAULT x2 threads"), two
