"""What watching a cell costs, on one cell of the embedded default (digits, ResNet-18, random real
images at IPC 10 or 1, soft labels: the cross-arch suite's protocol), measured side by side in one
process so a shared machine's load hits every mode alike: rounds of

    bare         --curve-points 0, no logger (only the record's final held-out evaluation)
    curves       --curve-points POINTS (default: the default, DEFAULT_CURVE_POINTS)
    tensorboard  curves + --log tensorboard
    wandb        curves + --log wandb (offline)

in turn. Per mode: the best and the median wall time of the whole cell (evaluate()), and the
added work timed directly inside the cell (the epoch hook: held-out evaluations and logger calls;
opening and finishing the logger run), as a share of the cell's training time. The teacher and
the distilled set come from the cache (trained on the first run).

    python benchmarks/watch_overhead.py ROUNDS [CACHE_DIR [IPC [POINTS]]]   # e.g. 3 /tmp/cdabench-watch 10
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdabench.config import load_task  # noqa: E402
from cdabench.distill.sets import distill  # noqa: E402
from cdabench.distill.squeeze import get_teacher  # noqa: E402
from cdabench.engine import watch as watch_module  # noqa: E402
from cdabench.engine.context import open_context  # noqa: E402
from cdabench.evaluate import posttrain  # noqa: E402

ROUNDS = int(sys.argv[1])
CACHE = Path(sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="cdabench-watch-"))
IPC = int(sys.argv[3]) if len(sys.argv) > 3 else 10
POINTS = int(sys.argv[4]) if len(sys.argv) > 4 else watch_module.DEFAULT_CURVE_POINTS
MODES = {"bare": (0, ()), "curves": (POINTS, ()), "tensorboard": (POINTS, ("tensorboard",)),
         "wandb": (POINTS, ("wandb",))}
added = {"seconds": 0.0}


def timed(function):
    """Count the wall time spent inside `function` into added["seconds"]."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            added["seconds"] += time.perf_counter() - start
    return wrapper


# The work watching adds, timed where it happens: the epoch hook (held-out evaluations, logger
# calls) and the logger run's opening and closing.
original_hook = posttrain._curve_hook
posttrain._curve_hook = lambda *args: timed(original_hook(*args))
posttrain.open_run = timed(watch_module.open_run)
watch_module.RunLogger.finish = timed(watch_module.RunLogger.finish)

ctx = open_context(load_task("digits"), None, "cpu", CACHE)
teacher = get_teacher(ctx)
data = CACHE / f"random-ipc{IPC}"
distill(ctx, "random", IPC, 0, data, teacher=teacher)
results = {mode: [] for mode in MODES}
with tempfile.TemporaryDirectory() as logs:
    for round_ in range(ROUNDS + 1):   # round 0 warms up (imports, the first W&B service start)
        for mode, (points, loggers) in MODES.items():
            added["seconds"] = 0.0
            start = time.perf_counter()
            record = posttrain.evaluate(ctx, data, "resnet18", "soft", 0, teacher=teacher,
                                        watch=watch_module.Watch(points, loggers, f"{logs}/{mode}{round_}"))
            total = time.perf_counter() - start
            if round_:
                results[mode].append((total, added["seconds"], record["seconds"]["posttrain"]))
            print(f"round {round_} {mode:12} cell {total:6.2f}s  added {added['seconds']:5.2f}s  "
                  f"top-1 {record['top1']:.2f}", flush=True)
bare = statistics.median(r[0] for r in results["bare"])
print(f"\n{'mode':12} {'best cell':>10} {'median cell':>12} {'vs bare':>8} {'added (median)':>15} {'of training':>12}")
for mode, rows in results.items():
    median = statistics.median(r[0] for r in rows)
    extra = statistics.median(r[1] for r in rows)
    share = statistics.median(r[1] / r[2] for r in rows)
    print(f"{mode:12} {min(r[0] for r in rows):9.2f}s {median:11.2f}s {median / bare - 1:+7.1%} {extra:14.3f}s "
          f"{share:11.1%}")
