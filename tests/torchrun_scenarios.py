"""Run by tests/test_distributed.py under `torchrun --nproc-per-node 2` (and imported by it, to run
the same data-parallel scenarios in one process): every rank runs the steps of a plan, in order, in
one launch, so the start-up of two ranks (torch, timm and Avalanche imported) is paid once.

A plan is a JSON list of steps:
- {"cli": [argv...]}: `cdabench` with these arguments (cdabench.cli.main, as `python -m cdabench.cli`
  runs it); a non-zero exit ends the rank, and torchrun then ends the other;
- {"script": KIND, "out": PATH}: `run_script(KIND, PATH)`: train a small BN-free CNN on a fixed random
  set with CutMix hard labels ("hard") or online KD ("online") and save the final weights (rank 0),
  or build a label store with a small teacher ("relabel-<topk>");
- {"copy": [SRC, DST]}: rank 0 copies a file (a snapshot of what the steps before it wrote).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from cdabench.cli import main as cli_main
from cdabench.config import TrainRecipe
from cdabench.engine.augment import AugmentSpec
from cdabench.engine.labels import HardLabels, LabelStoreConfig, OnlineKD, build_label_store
from cdabench.engine.runtime import init_process_group
from cdabench.engine.train import ImageBank, Normalizer, train_model


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def run_script(labels_kind: str, out: str) -> None:
    device = torch.device("cpu")
    group = init_process_group(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8, generator=generator)
    bank = ImageBank(images, torch.arange(23) % 5)
    spec = AugmentSpec(crop="rrc", min_scale=0.25, flip=True, mix="cutmix")
    normalizer = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), device)
    if labels_kind.startswith("relabel"):  # relabel-<topk>: 5 epochs dealt 3/2 over two ranks
        config = LabelStoreConfig(epochs=5, batch_size=10, augment=spec, topk=int(labels_kind[8:]), seed=7)
        build_label_store(Path(out), small_cnn(1), images, config, normalizer, device, 8, group=group)
        return
    # 23 images at a global batch of 10: batches of 10, 10, 3 (split 5/5, 5/5, 2/1 over two ranks).
    recipe = TrainRecipe(model="small", epochs=3, batch_size=10, optimizer="sgd", lr=0.1, momentum=0.9,
                         weight_decay=5e-4, warmup_epochs=1, augment=spec)
    if labels_kind == "hard":
        labels = HardLabels(spec, 8)
    else:
        labels = OnlineKD(spec, 8, small_cnn(1).eval(), normalizer, temperature=4.0, t_squared=True)
    model = small_cnn(0)
    result = train_model(model, bank, labels, recipe, normalizer, device, seed=3, image_size=8, group=group)
    if group.is_main:
        torch.save({"state": model.state_dict(), "losses": torch.tensor([h["loss"] for h in result.history]),
                    "teacher_forwards": torch.tensor(result.teacher_forwards)}, out)


def run_plan(plan: list[dict]) -> None:
    for step in plan:
        if "cli" in step:
            code = cli_main(step["cli"])
            if code != 0:
                sys.exit(f"cdabench {' '.join(step['cli'])} exited with {code}")
        elif "copy" in step:
            if init_process_group(torch.device("cpu")).is_main:
                shutil.copy(*step["copy"])
        else:
            run_script(step["script"], step["out"])


if __name__ == "__main__":
    torch.set_num_threads(1)  # a process of its own: the test's thread count does not reach it (OMP_NUM_THREADS does)
    run_plan(json.loads(Path(sys.argv[1]).read_text()))
