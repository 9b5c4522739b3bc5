"""Recover speed on one GPU: ms per 100-image step, projected GPU-hours, peak memory.

Runs cdabench's recover engine (cdabench.distill.recover.recover_shards) on a random-init
ResNet-18 teacher (speed does not depend on the weights; no data needed) with the CDA settings of
tasks/imagenet-1k.toml (224 px, 1000 classes, jitter 32) and tasks/tiny-imagenet.toml (64 px,
small stem, 200 classes, jitter 4), for K shards per forward and each precision, eager and (for
the sizes and K of --compile-sizes / --compile-shards) compiled (`compile = true`; its compile time
falls in the warm-up, which then takes a minute or so), and prints:
  size  K  precision  compiled  ms per 100-image step  peak GiB  projected GPU-hours (the task at IPC 50)
The projection is shards x iterations x step time: plan_shards(classes, 50, 100) shards of the
task's 4,000 iterations (ImageNet-1K: 500 shards; Tiny-ImageNet: 100).

    python benchmarks/gpu_recover.py                     # about 4-5 minutes on one H100/H200
    python benchmarks/gpu_recover.py --device cpu --sizes 16 --shards 1 2 --precisions fp32 \
        --warmup 1 --steps 1 --batch 10 --compile-sizes  # a dry run of the script on a CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cdabench.config import CDA, load_task, recover_config  # noqa: E402
from cdabench.distill.recover import RecoverForward, freeze, plan_shards, recover_shards  # noqa: E402
from cdabench.engine.models import create_model  # noqa: E402
from cdabench.engine.runtime import bf16_supported, device_description, prepare_model  # noqa: E402

TASK_OF_SIZE = {224: ("imagenet-1k", 1000), 64: ("tiny-imagenet", 200)}
IPC = 50


def measure(teacher, config, shards: int, batch: int, size: int, classes: int, device, warmup: int,
            steps: int) -> tuple[float, float, bool]:
    """(ms per B-image step, peak GiB, whether it ran compiled) of K shards per forward, timed over
    `steps` iterations after `warmup` (cuDNN's algorithm search, allocations and compilation happen
    in the warm-up). A compile that fails here falls back to eager, with a warning, and says so."""
    marks = {}

    def on_step(t, ce, bn):   # synchronise only at the two timing points
        if t in (warmup - 1, warmup + steps - 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[t] = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = dataclasses.replace(config, iterations=warmup + steps, batch_size=batch, shards_per_forward=shards)
    labels = [[(k * batch + i) % classes for i in range(batch)] for k in range(shards)]
    with RecoverForward(teacher, config, device) as forward:
        recover_shards(teacher, labels, config, list(range(shards)), (3, size, size), (0.485, 0.456, 0.406),
                       (0.229, 0.224, 0.225), device, on_step, forward)
    seconds = (marks[warmup + steps - 1] - marks[warmup - 1]) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return 1000 * seconds / shards, peak, forward.compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument("--shards", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile-sizes", nargs="*", type=int, default=[224],
                        help="sizes also measured compiled (none: eager only)")
    parser.add_argument("--compile-shards", nargs="*", type=int, default=[4], help="K also measured compiled")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --device cpu for a dry run", file=sys.stderr)
        return 2
    print(f"device {device_description(device)}, torch {torch.__version__}, "
          f"cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32} (fp32 convolutions use TF32 when True)")
    print(f"{'size':>5} {'K':>3} {'precision':>9} {'compiled':>8} {'ms/100-img step':>16} {'peak GiB':>9} "
          f"{'GPU-h (task, IPC 50)':>24}")
    for size in args.sizes:
        task_name, classes = TASK_OF_SIZE.get(size, ("tiny-imagenet", 200))
        task = load_task(task_name)
        config = recover_config(task, CDA)
        shards_total = len(plan_shards(classes, IPC, config.batch_size))
        torch.manual_seed(0)
        teacher = freeze(prepare_model(create_model("resnet18", classes, 3, size), device))
        for precision in args.precisions:
            if precision == "bf16" and not bf16_supported(device):
                print(f"{size:>5}   - {precision:>9}  skipped: no native bf16 on this device")
                continue
            for shards in args.shards:
                compiles = [False] + ([True] if size in args.compile_sizes and shards in args.compile_shards else [])
                for want_compiled in compiles:
                    run = dataclasses.replace(config, precision=precision, compile=want_compiled)
                    ms, peak, compiled = measure(teacher, run, shards, args.batch, size, classes, device,
                                                 args.warmup, args.steps)
                    per_100 = ms * 100 / args.batch
                    hours = shards_total * config.iterations * per_100 / 1000 / 3600
                    print(f"{size:>5} {shards:>3} {precision:>9} {str(compiled).lower():>8} {per_100:>16.2f} "
                          f"{peak:>9.2f} {hours:>14.2f} ({task_name})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
