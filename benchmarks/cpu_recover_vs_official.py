"""Interleaved CPU timing at the Tiny-ImageNet shape (ResNet-18 small stem, 64 px, batch 100, one
thread): the official loop's structure (tests/test_benchmarks.official_reference_loop) against
cdabench's recover, eager and compiled (`compile = true`), in fp32 and bf16, K = 1, alternating
modes each round so a shared machine's load hits every mode alike; prints each mode's best round
and its ratio to the reference. A compiled mode is compiled once before the rounds (about a
minute): what a long run pays once, not per step.

    python benchmarks/cpu_recover_vs_official.py ITERATIONS ROUNDS [MODE ...]   # e.g. 1 2
    modes: reference, fp32, fp32-compiled, bf16, bf16-compiled (default: all)
"""
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_benchmarks import IMAGENET_MEAN, IMAGENET_STD, _tiny_teacher, official_reference_loop  # noqa: E402
from cdabench.distill.recover import RecoverConfig, RecoverForward, recover_shards  # noqa: E402
from cdabench.schema import CropSchedule  # noqa: E402

B, T, ROUNDS = 100, int(sys.argv[1]), int(sys.argv[2])
CPU, SHAPE = torch.device("cpu"), (3, 64, 64)
teacher = _tiny_teacher(64)
labels = [[i % 200 for i in range(B)]]


def ours(precision: str, compiled: bool):
    config = RecoverConfig(iterations=T, batch_size=B, jitter=4, crop=CropSchedule("cosine", 1.0),
                           precision=precision, shards_per_forward=1, compile=compiled)
    if not compiled:   # hooks registered per call, as recover_shards alone does
        return lambda: recover_shards(teacher, labels, config, [0], SHAPE, IMAGENET_MEAN, IMAGENET_STD, CPU)
    # A compiled mode keeps its forward (and its hooks) for all rounds: its own copy of the teacher,
    # so no other mode's hooks run in its forward.
    own = copy.deepcopy(teacher)
    forward = RecoverForward(own, config, CPU)
    start = time.perf_counter()   # compile outside the timed rounds
    recover_shards(own, labels, dataclasses.replace(config, iterations=1), [0], SHAPE, IMAGENET_MEAN,
                   IMAGENET_STD, CPU, forward=forward)
    print(f"{precision} compiled: compiled in {time.perf_counter() - start:.0f} s "
          f"({'compiled' if forward.compiled else 'fell back to eager'})", flush=True)
    return lambda: recover_shards(own, labels, config, [0], SHAPE, IMAGENET_MEAN, IMAGENET_STD, CPU,
                                  forward=forward)


all_modes = {"reference": lambda: (lambda: official_reference_loop(teacher, torch.arange(B) % 200, 64, T)),
             "fp32": lambda: ours("fp32", False), "fp32-compiled": lambda: ours("fp32", True),
             "bf16": lambda: ours("bf16", False), "bf16-compiled": lambda: ours("bf16", True)}
chosen = sys.argv[3:] or list(all_modes)
if "reference" not in chosen:
    chosen.insert(0, "reference")
modes = {m: all_modes[m]() for m in chosen}
best = {m: float("inf") for m in modes}
for r in range(ROUNDS):
    for m, fn in modes.items():
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        best[m] = min(best[m], seconds)
        print(f"round {r} {m}: {seconds:.1f} s, {B * T / seconds:.2f} image-it/s", flush=True)
for m in modes:
    print(f"{m}: min {best[m]:.1f} s, {B * T / best[m]:.2f} image-iterations/s, "
          f"x{best['reference'] / best[m]:.2f} the reference")
