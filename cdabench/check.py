"""Regression checks: fresh records against committed targets, one-sided (only worse fails).

targets.csv: task, method, ipc ('full' for the full data), student, labels, target_top1, tolerance.
A cell regresses when its mean top-1 over the records' seeds is below target_top1 - tolerance;
a target with no record is missing. Both fail the check."""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

from cdabench import packaged, stats

FIELDS = ("task", "method", "ipc", "student", "labels", "target_top1", "tolerance")


@dataclass(frozen=True)
class Target:
    task: str
    method: str
    ipc: int | None
    student: str
    labels: str
    target_top1: float
    tolerance: float

    @property
    def key(self) -> tuple:
        return (self.task, self.method, self.ipc, self.student, self.labels)


@dataclass(frozen=True)
class CellStatus:
    target: Target
    measured: float | None
    seeds: int
    status: str          # ok | regressed | missing

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def packaged_targets() -> Traversable:
    """The committed targets that ship with the package (cdabench/builtin/leaderboards/targets.csv)."""
    return packaged.builtin("leaderboards", "targets.csv")


def read_targets(path: Path | Traversable | str | None = None) -> list[Target]:
    """The targets in `path` (a user's CSV), or the packaged ones when no path is given."""
    path = packaged_targets() if path is None else path
    path = Path(path) if isinstance(path, str) else path
    if not path.is_file():
        raise FileNotFoundError(f"no targets file at {path}: write one with check.write_targets from a run's records")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [f for f in FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(FIELDS)}")
        return [Target(row["task"], row["method"], None if row["ipc"] == "full" else int(row["ipc"]),
                       row["student"], row["labels"], float(row["target_top1"]), float(row["tolerance"]))
                for row in reader]


def _cross_arch(records: list[dict]) -> list[dict]:
    """Continual records share the schema but not the meaning of top1: never mix them in."""
    return [r for r in records if not r.get("continual")]


def compare(records: list[dict], targets: list[Target]) -> list[CellStatus]:
    measured = defaultdict(list)
    for r in _cross_arch(records):
        measured[(r["task"], r["method"], r["ipc"], r["student"], r["labels"])].append(r["top1"])
    out = []
    for t in targets:
        values = measured.get(t.key, [])
        if not values:
            out.append(CellStatus(t, None, 0, "missing"))
            continue
        value = stats.mean(values)
        out.append(CellStatus(t, value, len(values), "ok" if value >= t.target_top1 - t.tolerance else "regressed"))
    return out


def write_targets(path: Path, records: list[dict], spread_records: list[dict] | None = None,
                  k: float = 3.0, floor: float = 1.0) -> list[Target]:
    """Targets from measured records: the mean per cell; tolerance = max(floor, k x the seed-to-seed
    std measured in `spread_records` (or in `records` when they hold several seeds))."""
    cells, spread = defaultdict(list), defaultdict(list)
    for r in _cross_arch(records):
        cells[(r["task"], r["method"], r["ipc"], r["student"], r["labels"])].append(r["top1"])
    for r in _cross_arch(spread_records or records):
        spread[(r["task"], r["method"], r["ipc"], r["student"], r["labels"])].append(r["top1"])
    targets = [Target(*key, round(stats.mean(v), 2), round(max(floor, k * stats.std(spread.get(key, v))), 2))
               for key, v in sorted(cells.items(), key=lambda kv: tuple(str(x) for x in kv[0]))]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(FIELDS)
        for t in targets:
            writer.writerow([t.task, t.method, "full" if t.ipc is None else t.ipc, t.student, t.labels,
                             f"{t.target_top1:.2f}", f"{t.tolerance:.2f}"])
    return targets
