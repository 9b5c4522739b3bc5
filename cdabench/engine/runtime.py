"""Devices, precision, seeding, process groups and version stamps: the run-time environment."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import sys
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torchvision

from cdabench import __version__


# What torchrun (torch.distributed.elastic) puts in each rank's environment. A process spawned by
# a rank inherits it and would join (and hang) the rank's process group: workers strip it.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_",)


def strip_launcher_env(environ=None) -> list[str]:
    """Remove torchrun's variables from `environ` (default os.environ), so that this process is a
    plain single process; returns the names removed."""
    environ = os.environ if environ is None else environ
    names = [k for k in list(environ) if k in LAUNCHER_ENV or k.startswith(LAUNCHER_ENV_PREFIXES)]
    for name in names:
        del environ[name]
    return names


def local_device_index(local_rank: int | None, visible: int) -> int:
    """The CUDA device of this process among the `visible` ones: LOCAL_RANK when the launcher shows
    the process every GPU of its node, the one visible device when it shows one GPU per task
    (Slurm --gpus-per-task, CUDA_VISIBLE_DEVICES set per rank)."""
    if visible < 1:
        raise RuntimeError("no CUDA device is visible to this process: use --device cpu, or check "
                           "CUDA_VISIBLE_DEVICES / the launcher's GPU binding")
    if local_rank is None or visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise RuntimeError(f"LOCAL_RANK is {local_rank} but only {visible} CUDA devices are visible to this process: "
                       "start at most one process per visible GPU (torchrun --nproc-per-node <= the GPU count), "
                       "or make the launcher show each process exactly one GPU")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes the local GPU when there is one (the one torchrun assigned to this rank, see
    `local_device_index`); `cuda:N` is used as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
        count = torch.cuda.device_count()
        if name == "cuda":
            local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
            name = f"cuda:{local_device_index(local_rank, count)}"
        elif not (name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) < count):
            raise ValueError(f"unknown device {name!r}: this process sees {count} CUDA device(s), "
                             f"use cuda or cuda:0 .. cuda:{count - 1}")
    elif name != "cpu":
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def activate_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (NCCL, caching allocator and any
    `.cuda()` call inside libraries use it), also in a plain single process on cuda:N."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def worker_devices(device: torch.device, workers: int, world: int = 1) -> list[str]:
    """The device of each of `workers` worker processes started by one process. Without torchrun,
    on a GPU, the workers are dealt round-robin over every visible GPU, starting at this process's
    (restrict them with CUDA_VISIBLE_DEVICES); under torchrun each rank owns one GPU, and its
    workers share it. On the CPU every worker is on the CPU."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and world == 1 and count > 1:
        first = device.index or 0
        return [f"cuda:{(first + i) % count}" for i in range(workers)]
    return [str(device)] * workers


def launched_world() -> int:
    """The number of torchrun processes this one belongs to (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank among torchrun's processes (0 when run plainly), before any group exists."""
    return int(os.environ.get("RANK", "0"))


PRECISIONS = ("fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 arithmetic: CUDA devices of compute capability >= 8 (Ampere on), CPUs with
    AVX-512 BF16 / AMX (what oneDNN reports). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_precision(precision: str, device: torch.device) -> str:
    """`precision` if this device runs it natively; a clear error otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"--precision bf16 was asked for, but {device_description(device)} has no native bf16 "
                         "(CUDA compute capability >= 8, or a CPU with AVX-512 BF16 / AMX): use --precision fp32")
    return precision


def autocast(device: torch.device, precision: str = "fp32"):
    """bf16 autocast of the forward pass when `precision` is "bf16" (CUDA or CPU; no loss scaler
    is needed for bf16); "fp32" is plain fp32, the papers' precision. Losses and BN statistics are
    computed in fp32 by their callers either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device, in channels-last where its convolutions are faster in it: on CUDA every
    model; on a CPU a model with depthwise convolutions (MobileNetV2's), whose oneDNN kernels are
    faster in channels-last (a MobileNetV2-0.35 post-train step at 8 px: 1.5x here, 1.25x with
    AVX2 only), while dense ones gain little at small widths and lose up to 19 % at the papers'
    widths (docs/digits-narrow-panel.md). The layout changes the float path, not the arithmetic."""
    model = model.to(device)
    if device.type == "cuda" or has_depthwise_conv(model):
        model = model.to(memory_format=torch.channels_last)
    return model


def has_depthwise_conv(model: torch.nn.Module) -> bool:
    """Whether any 2-d convolution of `model` is depthwise (one group per input channel)."""
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def seed_everything(seed: int) -> None:
    """Global seeds for libraries we do not control; our own random choices use explicit generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_description(device: torch.device) -> str:
    """The device as records name it. On a CPU also the kernels' instruction set (ATen's capability,
    and oneDNN's cap where ONEDNN_MAX_CPU_ISA sets one) and the thread count: each draws another
    float path, so two records that differ here are two measurements, not one repeated."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    isa = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"cpu:{platform.processor() or platform.machine()} {isa}{f' oneDNN<={onednn}' if onednn else ''}"
            f" x{torch.get_num_threads()} threads")


def versions() -> dict[str, str]:
    return {
        "cdabench": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the torchrun processes (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over the ranks (a new tensor)."""
        values = values.clone()
        if self.world > 1:
            torch.distributed.all_reduce(values)
        return values


def init_process_group(device: torch.device) -> ProcessGroup:
    """Join torchrun's group if launched by it: gloo on CPU, NCCL with one device per process on GPU.
    One process per device, never DataParallel: a wrapped teacher corrupts the BN statistics."""
    activate_device(device)
    world = launched_world()
    if world == 1:
        return ProcessGroup()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A long timeout: ranks wait at barriers while rank 0 trains a teacher or writes a manifest.
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(days=7))
    return ProcessGroup(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())
