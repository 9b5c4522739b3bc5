"""The papers' published numbers (packaged tables, methods.md section 6) and the rule that puts a
status beside ours: the cross-architecture table, the continual per-step table, `status`."""
from __future__ import annotations

import csv
from importlib.resources.abc import Traversable
from pathlib import Path

from cdabench import packaged, stats


def read_cross_arch(path: Path | Traversable | None = None) -> list[dict]:
    """published.csv: dataset, ipc, method, student, top1, source."""
    path = packaged.builtin("leaderboards", "published.csv") if path is None else path
    with path.open(newline="") as fh:
        return [dict(row, ipc=int(row["ipc"]), top1=float(row["top1"])) for row in csv.DictReader(fh)]


def read_continual(path: Path | Traversable | None = None) -> list[dict]:
    """published_continual.csv: one row per (scenario, step); none when the file is absent."""
    path = packaged.builtin("leaderboards", "published_continual.csv") if path is None else path
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [dict(row, steps=int(row["steps"]), ipc=int(row["ipc"]), step=int(row["step"]),
                     classes_seen=int(row["classes_seen"]), top1=float(row["top1"]),
                     masked=row["masked"].strip().lower() == "true") for row in csv.DictReader(fh)]


def status(measured: list[float], published: float) -> str:
    """reproduced: within 1 point (or better); within tolerance: within max(3, 2 std) points;
    otherwise not reproduced; no record: not run."""
    if not measured:
        return "not run"
    gap = stats.mean(measured) - published
    if gap >= -1.0:
        return "reproduced"
    if gap >= -max(3.0, 2 * stats.std(measured)):
        return "within tolerance"
    return "not reproduced"
