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


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes the local GPU when there is one (the one torchrun assigned to this rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    elif name != "cpu":
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


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
    """Move to the device; channels-last on CUDA, where convolutions are faster in it."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def seed_everything(seed: int) -> None:
    """Global seeds for libraries we do not control; our own random choices use explicit generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


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


def init_process_group(device: torch.device) -> ProcessGroup:
    """Join torchrun's group if launched by it: gloo on CPU, NCCL with one device per process on GPU.
    One process per device, never DataParallel: a wrapped teacher corrupts the BN statistics."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ProcessGroup()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A long timeout: ranks wait at barriers while rank 0 trains a teacher or writes a manifest.
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(days=7))
    return ProcessGroup(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())
