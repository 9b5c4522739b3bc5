"""The doubling test of convergence, from records only: one grid run twice, the second with every
post-train epoch count doubled (or the recover iterations). Per row (task, IPC, method, label
protocol, augmentation): each student's mean over the seeds both runs hold, and the panel mean over
every (student, seed) both hold, base -> doubled. A protocol has converged where no row's panel mean
moves by more than `panel_limit` points and no student's mean by more than `student_limit`
(issue 18's criterion: 2 and 5; docs/digits.md). A single cell moves with its float path; the
seeds' mean is what converges."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cdabench import stats
from cdabench.records import is_continual
from cdabench.results.report import augmentation, md_table, row_label, student_order

PANEL_LIMIT, STUDENT_LIMIT = 2.0, 5.0


@dataclass(frozen=True)
class Change:
    base: float
    doubled: float
    n: int                                  # the cells (seeds; student x seed for the panel) paired

    @property
    def delta(self) -> float:
        return self.doubled - self.base


@dataclass
class DoublingRow:
    task: str
    ipc: int | None
    method: str
    labels: str
    augment: str
    students: dict[str, Change] = field(default_factory=dict)
    panel: Change | None = None

    @property
    def label(self) -> str:
        return row_label(self.method, self.labels, self.augment)


def _by_cell(found: list[dict], metric: str, which: str) -> dict[tuple, dict[tuple, float]]:
    rows: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for r in found:
        if is_continual(r):
            continue
        if r.get(metric) is None:
            raise ValueError(f"the {which} run's record of {r.get('cell', r['method'])} has no {metric!r}: "
                             "compare on top1, or re-run it with this cdabench version (records carry heldout_top1)")
        key = (r["task"], r["ipc"], r["method"], r["labels"], augmentation(r))
        rows[key][(r["student"], r["seed"])] = r[metric]
    return rows


def doubling(base: list[dict], doubled: list[dict], metric: str = "heldout_top1") -> list[DoublingRow]:
    """The rows both runs hold, each over the (student, seed) cells both hold."""
    a, b = _by_cell(base, metric, "base"), _by_cell(doubled, metric, "doubled")
    out = []
    # Per task: the largest IPC first, the full data last; soft labels, then augmentation off, then hard.
    for key in sorted(a.keys() & b.keys(), key=lambda k: (k[0], k[1] is None, -(k[1] or 0), k[3] != "soft", k[4] != "on", k[2])):
        pairs = sorted(a[key].keys() & b[key].keys())
        if not pairs:
            continue
        row = DoublingRow(*key)
        for student in sorted({s for s, _ in pairs}, key=student_order):
            seeds = [seed for s, seed in pairs if s == student]
            row.students[student] = Change(stats.mean([a[key][(student, x)] for x in seeds]),
                                           stats.mean([b[key][(student, x)] for x in seeds]), len(seeds))
        row.panel = Change(stats.mean([a[key][p] for p in pairs]), stats.mean([b[key][p] for p in pairs]), len(pairs))
        out.append(row)
    return out


def worst(rows: list[DoublingRow]) -> tuple[float, float]:
    """The largest |change| of a panel mean and of a student's mean."""
    panel = max((abs(r.panel.delta) for r in rows), default=0.0)
    student = max((abs(c.delta) for r in rows for c in r.students.values()), default=0.0)
    return panel, student


def converged(rows: list[DoublingRow], panel_limit: float = PANEL_LIMIT, student_limit: float = STUDENT_LIMIT) -> bool:
    panel, student = worst(rows)
    return panel <= panel_limit and student <= student_limit


def markdown(rows: list[DoublingRow], panel_limit: float = PANEL_LIMIT, student_limit: float = STUDENT_LIMIT) -> list[str]:
    """One table: a column per student, then the panel mean; ✗ where a limit is exceeded."""
    students = sorted({s for r in rows for s in r.students}, key=student_order)

    def cell(change: Change | None, limit: float) -> str:
        if change is None:
            return "–"
        flag = " ✗" if abs(change.delta) > limit else ""
        return f"{change.base:.1f} → {change.doubled:.1f} ({change.delta:+.1f}){flag}"
    table = [[r.task, "full" if r.ipc is None else str(r.ipc), r.label]
             + [cell(r.students.get(s), student_limit) for s in students]
             + [cell(r.panel, panel_limit), str(r.panel.n)] for r in rows]
    panel, student = worst(rows)
    return md_table(["task", "IPC", "method"] + students + ["panel mean", "cells"], table) + [
        "", f"Largest change of a panel mean {panel:.1f} points (limit {panel_limit:g}), of a student's mean "
            f"{student:.1f} (limit {student_limit:g}): {'' if converged(rows, panel_limit, student_limit) else 'not '}converged."]
