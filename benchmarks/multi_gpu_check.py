"""Multi-GPU check (about 5 minutes on two recent GPUs; synthetic data, nothing downloaded).

    python benchmarks/multi_gpu_check.py [--out /tmp/cdabench-gpu-check] [--gpus 2]

1. distil (teacher + CDA recover) and evaluate (post-train with online KD) on ONE GPU;
2. the same under `torchrun --nproc-per-node G` (DDP teacher and post-train, recover shards
   dealt across ranks, one record written by rank 0), from an empty cache;
3. a small suite with `--workers 1` and then `--workers G` (one worker pinned to each GPU).
For each phase it prints the wall time, the mean utilisation and peak memory of every GPU
(sampled by nvidia-smi once a second) and the scaling factor (1-GPU time / G-GPU time). With a
single GPU it runs the one-GPU phases only. The data: a generated ImageFolder of 10 classes x
300 JPEGs at 128 px whose classes differ in colour and stripe frequency (learnable, so the
teacher passes the class-order guard), read through the prepared cache at 64 px.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

TASK = """
description = "multi-GPU check: synthetic ImageFolder at 64 px"
dataset = "imagefolder"
image_size = 64
ipcs = [10]
holdout_per_class = 20
[teacher]
model = "resnet18"
epochs = 10
batch_size = 128
optimizer = "sgd"
lr = 0.1
warmup_epochs = 1
augment = { crop = "rrc", min_scale = 0.5, flip = true }
[recover.cda]
iterations = 200
batch_size = 50
jitter = 4
[posttrain.recipe]
epochs = 30
batch_size = 50
optimizer = "adamw"
lr = 0.001
augment = { crop = "rrc", min_scale = 0.25, flip = true }
[posttrain.kd]
mode = "online"
temperature = 4.0
t_squared = true
"""

SUITE = 'task = "{task}"\nmethods = ["random", "herding"]\nstudents = ["resnet18", "mobilenetv2"]\nseeds = [0, 1]\n'


def make_images(root: Path, classes: int = 10, per_class: int = 300, size: int = 128) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (("train", per_class), ("val", per_class // 5)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256], dtype=np.float32)
            for k in range(count):
                phase = rng.uniform(0, 2 * np.pi)
                stripes = 0.5 + 0.5 * np.sin((c + 1) * 2 * np.pi * (xx + yy) / size + phase)
                pixels = colour * stripes[..., None] + rng.normal(0, 25, (size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{k:04d}.JPEG", quality=90)


class GpuSampler:
    """nvidia-smi once a second in a thread: per-GPU utilisation (%) and memory (MiB)."""

    def __init__(self):
        self.samples: list[tuple[int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
            for line in out.strip().splitlines():
                index, util, memory = (float(v) for v in line.split(","))
                self.samples.append((int(index), util, memory))
            self._stop.wait(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, gpus: int) -> str:
        parts = []
        for g in range(gpus):
            mine = [s for s in self.samples if s[0] == g]
            if mine:
                parts.append(f"gpu{g} util {np.mean([s[1] for s in mine]):5.1f}% "
                             f"mem {max(s[2] for s in mine):6.0f} MiB")
        return "; ".join(parts)


def phase(name: str, commands: list[list[str]], env: dict, gpus_shown: int) -> float:
    start = time.perf_counter()
    with GpuSampler() as sampler:
        for command in commands:
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{name} failed: {' '.join(command)}\n{result.stderr[-4000:]}")
    seconds = time.perf_counter() - start
    print(f"{name:34s} {seconds:7.1f} s   {sampler.summary(gpus_shown)}", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/cdabench-gpu-check")
    parser.add_argument("--gpus", type=int, default=2)
    args = parser.parse_args()
    import torch
    visible = torch.cuda.device_count()
    if visible < 1:
        sys.exit("no CUDA device visible: this check needs a GPU")
    gpus = min(args.gpus, visible)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    make_images(out / "data")
    (out / "task.toml").write_text(TASK)
    (out / "suite.toml").write_text(SUITE.format(task=out / "task.toml"))
    python, cli = sys.executable, ["-m", "cdabench.cli"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={gpus}"]
    common = ["--task", str(out / "task.toml"), "--data-root", str(out / "data"), "--device", "cuda", "--quiet"]

    def pipeline(prefix, tag):
        return [[*prefix, "distill", *common, "--method", "cda", "--ipc", "10", "--out", str(out / f"cda-{tag}")],
                [*prefix, "evaluate", *common, "--data", str(out / f"cda-{tag}"), "--out", str(out / f"runs-{tag}")]]

    print(f"{visible} GPU(s) visible, using {gpus}: {torch.cuda.get_device_name(0)}")
    env1 = dict(os.environ, CDABENCH_CACHE=str(out / "cache-1"), CUDA_VISIBLE_DEVICES=os.environ.get(
        "CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(visible))).split(",")[0])
    one = phase("distil + evaluate, 1 GPU", pipeline([python, *cli], "1"), env1, 1)
    if gpus > 1:
        envg = dict(os.environ, CDABENCH_CACHE=str(out / f"cache-{gpus}"))
        many = phase(f"distil + evaluate, torchrun x{gpus}", pipeline([*torchrun, *cli], str(gpus)), envg, gpus)
        print(f"scaling, distil + evaluate: {one / many:.2f}x on {gpus} GPUs")
    suite = ["run", "--suite", str(out / "suite.toml"), *common]
    envs = dict(os.environ, CDABENCH_CACHE=str(out / "cache-1"))  # the teacher from phase 1
    one = phase("suite, --workers 1", [[python, *cli, *suite, "--workers", "1", "--out", str(out / "suite-1")]],
                envs, gpus)
    if gpus > 1:
        many = phase(f"suite, --workers {gpus}", [[python, *cli, *suite, "--workers", str(gpus),
                                                    "--out", str(out / f"suite-{gpus}")]], envs, gpus)
        print(f"scaling, suite cells: {one / many:.2f}x with {gpus} workers (one per GPU)")


if __name__ == "__main__":
    main()
