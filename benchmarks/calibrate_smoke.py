"""Calibrate the smoke check's targets over float paths: run the smoke suite (ten seeds) once per
float path this CPU can draw, then write cdabench/builtin/leaderboards/targets.csv from all of
them with check.write_targets (the paths' extra spread and the target's own error included).

A float path is what another machine would compute: oneDNN's ISA, ATen's vector kernels and the
threads per cell each change every seed's rounding. Each path runs in its own cache and folder
(the teacher is the task's packaged checkpoint, the same on every path).

    python benchmarks/calibrate_smoke.py OUT_DIR [--write]   # --write: replace the packaged targets

Prints, per path and cell, the ten seeds' mean and standard deviation, then the targets.
"""
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdabench import records, stats  # noqa: E402
from cdabench.results.check import packaged_targets, write_targets  # noqa: E402

# name: (environment, --workers). Two workers run one thread each; one worker runs two threads.
PATHS = {
    "avx512": ({}, "2"),
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "2"),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, "2"),
    "avx2-both": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "2"),
    "two-threads": ({}, "1"),
}


def main(out: Path, write: bool) -> None:
    rows = []
    for name, (env, workers) in PATHS.items():
        folder = out / name
        subprocess.run([sys.executable, "-m", "cdabench.cli", "run", "--suite", "smoke", "--workers", workers,
                        "--cache-dir", str(folder / "cache"), "--out", str(folder / "runs"), "--quiet"],
                       env=os.environ | env, check=True)
        path_rows = records.read_records(folder / "runs" / "records.jsonl")
        for method in sorted({r["method"] for r in path_rows}):
            for metric in ("top1", "label_agreement"):
                values = [r[metric] for r in path_rows if r["method"] == method]
                print(f"{name:13s} {method:7s} {metric:16s} mean {stats.mean(values):6.2f} "
                      f"sd {stats.std(values):5.2f}  n {len(values)}")
        rows += [r | {"float_path": name} for r in path_rows]
    target_file = Path(str(packaged_targets())) if write else out / "targets.csv"
    targets = write_targets(target_file, rows, two_sided=("cda",), metrics=("top1", "label_agreement"),
                            path_of=lambda r: r["float_path"])
    for t in targets:
        print(f"target {t.method:7s} {t.metric:16s} {t.target_top1:6.2f} ± {t.tolerance:.2f} ({t.sides}-sided)")
    print(f"written: {target_file}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), "--write" in sys.argv[2:])
