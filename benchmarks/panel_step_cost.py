"""The cost of one post-train step of each panel student on digits (8 px, batch 25, one thread):
the papers' standard widths against the narrow small-data entries of the registry, with online
KD from the standard ResNet-18 teacher and with hard labels. Each figure is the minimum over 12
steps after 3 warm-up steps (docs/digits.md has a measured table).

    python benchmarks/panel_step_cost.py [STUDENT ...]   # default: the pairs below
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdabench.engine.labels import HardLabels, OnlineKD  # noqa: E402
from cdabench.engine.models import create_model  # noqa: E402
from cdabench.engine.train import Normalizer, make_optimizer, train_step  # noqa: E402
from cdabench.schema import AugmentSpec, TrainRecipe  # noqa: E402

# standard width, its small-data entry; DeiT at patch 4 (two tokens a side at 8 px)
PAIRS = [("resnet18", "resnet18_w16"), ("resnet50", "resnet50_w16"), ("mobilenetv2", "mobilenetv2_035"),
         ("deit_tiny", "deit_w64")]
PATCH = {"deit_tiny": 4, "deit_w64": 4}
WARMUP, STEPS = 3, 12
NORMALIZER = Normalizer([0.3], [0.37], torch.device("cpu"))   # digits' grey level statistics, roughly


def ms_per_step(student: str, labels) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model(student, 10, 1, 8, patch_size=PATCH.get(student))
    recipe = TrainRecipe(model=student, optimizer="adamw", lr=0.01, weight_decay=0.01, decay_matrices_only=True)
    optimizer = make_optimizer(model, recipe)
    x = torch.randint(0, 256, (25, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (25,))
    rng = np.random.default_rng(0)
    model.train()
    times = []
    for _ in range(WARMUP + STEPS):
        start = time.perf_counter()
        train_step(model, optimizer, labels, NORMALIZER, torch.device("cpu"), x, y, None, 0, rng, None)
        times.append(time.perf_counter() - start)
    return sum(p.numel() for p in model.parameters()) / 1e6, 1000 * min(times[WARMUP:])


def main(students: list[str]) -> None:
    spec = AugmentSpec(crop="rrc", min_scale=0.25, flip=True)
    torch.manual_seed(0)
    teacher = create_model("resnet18", 10, 1, 8).eval()
    kinds = {"online KD": OnlineKD(spec, 8, teacher, NORMALIZER, 4.0, True), "hard labels": HardLabels(spec, 8)}
    print(f"{'student':16s} {'params':>8s}  " + "  ".join(f"{k:>12s}" for k in kinds))
    for student in students:
        cells = [ms_per_step(student, labels) for labels in kinds.values()]
        print(f"{student:16s} {cells[0][0]:7.2f}M  " + "  ".join(f"{ms:9.1f} ms" for _, ms in cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or [name for pair in PAIRS for name in pair])
