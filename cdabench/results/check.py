"""Regression checks: fresh records against committed targets, one-sided (only worse fails)
unless a target says otherwise.

targets.csv: task, method, ipc ('full' for the full data), student, labels, target_top1, tolerance,
and optionally sides (1 or 2; 1 when the column is absent) and metric (the record field compared:
top1 when absent; e.g. label_agreement, the teacher's agreement with a distilled set's labels).
A cell regresses when the mean of that field over the records' seeds is below target_top1 - tolerance; a two-sided target also fails as
changed when the mean is above target_top1 + tolerance. A target with no record is missing.
All three fail the check. Tolerances are at most MAX_TOLERANCE points (write_targets refuses
looser ones).

Why two-sided targets exist (a deviation from benchmark.md section 7, docs/suites.md): a target
on a reproduced method's cell (CDA in the smoke suite) checks that the method is unchanged, not
that it is good. Replacing CDA's crop curriculum by no crop at all raises CDA's top-1 on 8-px
digits (by ~12 points with a ResNet-18 teacher) and its label agreement to 100 %: a one-sided
check would call that broken code a pass."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable
from importlib.resources.abc import Traversable
from pathlib import Path

from cdabench import packaged, stats
from cdabench.records import is_continual, unique_cells
from cdabench.results.report import augmentation

FIELDS = ("task", "method", "ipc", "student", "labels", "target_top1", "tolerance")
OPTIONAL_FIELDS = ("sides", "metric")


@dataclass(frozen=True)
class Target:
    task: str
    method: str
    ipc: int | None
    student: str
    labels: str
    target_top1: float
    tolerance: float
    sides: int = 1       # 1: only worse fails; 2: a move either way beyond the tolerance fails
    metric: str = "top1"  # the record field compared (target_top1 then holds its target value)

    def __post_init__(self):
        if self.sides not in (1, 2):
            raise ValueError(f"target sides must be 1 or 2, got {self.sides!r}")

    @property
    def key(self) -> tuple:
        return (self.task, self.method, self.ipc, self.student, self.labels, self.metric)


@dataclass(frozen=True)
class CellStatus:
    target: Target
    measured: float | None
    seeds: int
    status: str          # ok | regressed | changed (above a two-sided band) | missing

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
                       row["student"], row["labels"], float(row["target_top1"]), float(row["tolerance"]),
                       int(row.get("sides") or 1), row.get("metric") or "top1")
                for row in reader]


def _cross_arch(records: list[dict]) -> list[dict]:
    """Continual records share the schema but not the meaning of top1, and cells with the
    student's augmentation off are another protocol: never mix them in."""
    return [r for r in records if not is_continual(r) and augmentation(r) == "on"]


def _cell_key(record: dict, metric: str) -> tuple:
    """A record's cell and the field compared, in Target.key's order."""
    return (record["task"], record["method"], record["ipc"], record["student"], record["labels"], metric)


def compare(records: list[dict], targets: list[Target]) -> list[CellStatus]:
    """Each target's status. A cell recorded twice (same cell_key) is one measurement: counted once."""
    measured = defaultdict(list)
    for r in _cross_arch(unique_cells(records)[0]):
        for metric in {t.metric for t in targets}:
            if r.get(metric) is not None:
                measured[_cell_key(r, metric)].append(r[metric])
    out = []
    for t in targets:
        values = measured.get(t.key, [])
        if not values:
            out.append(CellStatus(t, None, 0, "missing"))
            continue
        value = stats.mean(values)
        if value < t.target_top1 - t.tolerance:
            status = "regressed"
        elif t.sides == 2 and value > t.target_top1 + t.tolerance:
            status = "changed"
        else:
            status = "ok"
        out.append(CellStatus(t, value, len(values), status))
    return out


MAX_TOLERANCE = 5.0  # points: a looser target would let a real regression pass


def write_targets(path: Path, records: list[dict], k: float = 3.0, floor: float = 1.0,
                  max_tolerance: float = MAX_TOLERANCE, two_sided: tuple[str, ...] = (),
                  metrics: tuple[str, ...] = ("top1",), path_of: Callable[[dict], str] = lambda r: "") -> list[Target]:
    """Targets from measured records, run on one float path or several (`path_of` names a record's:
    e.g. the CPU ISA and thread count it ran under). Per cell, target = the mean over all records,
    and tolerance = max(floor, k x d), d the standard deviation of (a check's mean on a machine it
    has never seen - the target):

        d^2 = (s_w^2 / n + s_b^2) x (1 + 1/P)

    s_w the seed-to-seed standard deviation within a path (pooled), n the seeds a path has (the
    seeds the check averages), s_b^2 = max(0, var(the paths' means) - s_w^2 / n) what a path adds
    beyond drawing its seeds again, P the paths measured; (1 + 1/P): the target's own error. A cell
    whose tolerance would exceed `max_tolerance` is refused, naming it: it is too unstable to catch
    a regression (run more seeds, or train it to convergence). Targets of the methods in
    `two_sided` get sides = 2. `metrics`: the record fields to target (each cell gets one target
    per field its records carry)."""
    cells = defaultdict(lambda: defaultdict(list))
    for r in _cross_arch(records):
        for metric in metrics:
            if r.get(metric) is not None:
                cells[_cell_key(r, metric)][path_of(r)].append(r[metric])
    targets = [Target(*key[:5], round(stats.mean([v for vs in by_path.values() for v in vs]), 2),
                      round(max(floor, k * _check_spread(list(by_path.values()))), 2),
                      2 if key[1] in two_sided else 1, key[5])
               for key, by_path in sorted(cells.items(), key=lambda kv: tuple(str(x) for x in kv[0]))]
    loose = [t for t in targets if t.tolerance > max_tolerance]
    if loose:
        raise ValueError("too unstable for a regression target (tolerance > "
                         f"{max_tolerance:g} points): " + "; ".join(
                             f"{t.method} {'full' if t.ipc is None else f'ipc{t.ipc}'} {t.student} {t.labels}"
                             f"{'' if t.metric == 'top1' else ' ' + t.metric} (tolerance {t.tolerance:.2f})"
                             for t in loose)
                         + ". Average more seeds in the suite, or train the cell longer")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(FIELDS + OPTIONAL_FIELDS)
        for t in targets:
            writer.writerow([t.task, t.method, "full" if t.ipc is None else t.ipc, t.student, t.labels,
                             f"{t.target_top1:.2f}", f"{t.tolerance:.2f}", t.sides, t.metric])
    return targets


def _check_spread(paths: list[list[float]]) -> float:
    """d of write_targets: the standard deviation of a new path's mean minus the target."""
    n = stats.mean([len(v) for v in paths])
    within = math.fsum((len(v) - 1) * stats.std(v) ** 2 for v in paths) / max(1, sum(len(v) - 1 for v in paths))
    between = max(0.0, stats.std([stats.mean(v) for v in paths]) ** 2 - within / n) if len(paths) > 1 else 0.0
    return math.sqrt((within / n + between) * (1 + 1 / len(paths)))
