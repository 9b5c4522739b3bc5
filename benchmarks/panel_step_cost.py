"""The cost of one post-train step of each panel student on digits (8 px, batch 25, one CPU thread):
the papers' standard widths against the narrow small-data entries of the registry, with online
KD from the standard ResNet-18 teacher, with that teacher's logits stored once and replayed (an
FKD-style label store of the 100-image set, engine/labels.py), and with hard labels. Each figure
is the minimum over 12 steps after 3 warm-up steps (docs/digits-narrow-panel.md has the measured
tables). Models are prepared as post-training prepares them (`runtime.prepare_model`: device and
memory layout), so the figures are the harness's.

    python benchmarks/panel_step_cost.py [STUDENT ...] [--device cuda]   # default: the pairs below, CPU
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdabench.engine.labels import (HardLabels, LabelStoreConfig, OnlineKD, StoredLabels,  # noqa: E402
                                    build_label_store)
from cdabench.engine.models import create_model  # noqa: E402
from cdabench.engine.runtime import prepare_model  # noqa: E402
from cdabench.engine.train import Normalizer, make_optimizer, train_step  # noqa: E402
from cdabench.schema import AugmentSpec, TrainRecipe  # noqa: E402

# standard width, its small-data entry; DeiT at patch 4 (two tokens a side at 8 px)
PAIRS = [("resnet18", "resnet18_w16"), ("resnet50", "resnet50_w16"), ("mobilenetv2", "mobilenetv2_035"),
         ("deit_tiny", "deit_w64")]
PATCH = {"deit_tiny": 4, "deit_w64": 4}
WARMUP, STEPS = 3, 12
MEAN, STD = [0.3], [0.37]                                     # digits' grey level statistics, roughly
IMAGES, BATCH = 100, 25                                       # an IPC-10 set
SET = torch.randint(0, 256, (IMAGES, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def ms_per_step(student: str, labels, normalizer: Normalizer, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = prepare_model(create_model(student, 10, 1, 8, patch_size=PATCH.get(student)), device)
    recipe = TrainRecipe(model=student, optimizer="adamw", lr=0.01, weight_decay=0.01, decay_matrices_only=True)
    optimizer = make_optimizer(model, recipe)
    y = torch.randint(0, 10, (IMAGES,))
    rng = np.random.default_rng(0)
    model.train()
    times = []
    for step in range(WARMUP + STEPS):
        epoch, first = divmod(step * BATCH, IMAGES)            # the set in order, 4 batches an epoch
        idx = torch.arange(first, first + BATCH)
        start = time.perf_counter()
        train_step(model, optimizer, labels, normalizer, device, SET[idx], y[idx], idx, epoch, rng, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sum(p.numel() for p in model.parameters()) / 1e6, 1000 * min(times[WARMUP:])


def main(students: list[str], device: torch.device) -> None:
    spec = AugmentSpec(crop="rrc", min_scale=0.25, flip=True)
    normalizer = Normalizer(MEAN, STD, device)
    torch.manual_seed(0)
    teacher = prepare_model(create_model("resnet18", 10, 1, 8), device).eval()
    with tempfile.TemporaryDirectory(prefix="panel-step-store-") as folder:
        epochs = -(-(WARMUP + STEPS) * BATCH // IMAGES)
        build_label_store(Path(folder), teacher, SET, LabelStoreConfig(epochs, BATCH, spec), normalizer, device, 8)
        kinds = {"online KD": OnlineKD(spec, 8, teacher, normalizer, 4.0, True),
                 "stored KD": StoredLabels(Path(folder), spec, 8, 4.0, True, 10), "hard labels": HardLabels(spec, 8)}
        print(f"device: {device}")
        print(f"{'student':16s} {'params':>8s}  " + "  ".join(f"{k:>12s}" for k in kinds))
        for student in students:
            cells = [ms_per_step(student, labels, normalizer, device) for labels in kinds.values()]
            print(f"{student:16s} {cells[0][0]:7.2f}M  " + "  ".join(f"{ms:9.1f} ms" for _, ms in cells), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("students", nargs="*", default=[name for pair in PAIRS for name in pair])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args()
    main(args.students, torch.device(args.device))
