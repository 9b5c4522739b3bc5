"""Interleaved CPU timing at the Tiny-ImageNet shape (ResNet-18 small stem, 64 px, batch 100, one
thread): the official loop's structure (tests/test_benchmarks.official_reference_loop) against
cdabench's recover in fp32 (K = 1) and bf16 (K = 1, 2), alternating modes each round so a shared
machine's load hits every mode alike; prints each mode's best round and its ratio to the reference.

    python benchmarks/cpu_recover_vs_official.py ITERATIONS ROUNDS     # e.g. 1 2
"""
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.test_benchmarks import official_reference_loop, _tiny_teacher, IMAGENET_MEAN, IMAGENET_STD
from cdabench.distill.recover import RecoverConfig, recover_shards
from cdabench.schema import CropSchedule
B, T, ROUNDS = 100, int(sys.argv[1]), int(sys.argv[2])
teacher = _tiny_teacher(64)
def ours(prec, K):
    cfg = RecoverConfig(iterations=T, batch_size=B, jitter=4, crop=CropSchedule("cosine", 1.0), precision=prec, shards_per_forward=K)
    return lambda: recover_shards(teacher, [[(k*B+i) % 200 for i in range(B)] for k in range(K)], cfg, list(range(K)), (3, 64, 64), IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
modes = {"reference": (lambda: official_reference_loop(teacher, torch.arange(B) % 200, 64, T), 1),
         "fp32 K1": (ours("fp32", 1), 1), "bf16 K1": (ours("bf16", 1), 1), "bf16 K2": (ours("bf16", 2), 2)}
best = {m: float("inf") for m in modes}
for r in range(ROUNDS):
    for m, (fn, k) in modes.items():
        s = time.perf_counter(); fn(); dt = time.perf_counter() - s
        best[m] = min(best[m], dt)
        print(f"round {r} {m}: {dt:.1f} s, {k*B*T/dt:.2f} image-it/s", flush=True)
for m, (fn, k) in modes.items():
    print(f"{m}: min {best[m]:.1f} s, {k*B*T/best[m]:.2f} image-iterations/s, x{(k*B*T/best[m]) / (B*T/best['reference']):.2f} the reference")
