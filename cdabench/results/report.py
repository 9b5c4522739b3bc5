"""Summaries computed from records only: per method and student the mean ± std over seeds, the
panel mean and worst case, the gain over `random` under the same label protocol with a 95 %
interval, and Kendall's tau between the students' method rankings."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from rich.table import Table

from cdabench import stats
from cdabench.engine.models import MODELS
from cdabench.records import is_continual

BASELINE = "random"


def student_order(name: str) -> tuple:
    """The registry's panel order (ResNet-18, -50, -101, MobileNetV2, DeiT-Tiny), then any timm name."""
    names = list(MODELS)
    return (names.index(name), "") if name in names else (len(names), name)


def row_label(method: str, labels: str) -> str:
    return method if labels == "soft" else f"{method} (hard)"


@dataclass
class Row:
    task: str
    ipc: int | None
    method: str
    labels: str
    by_student: dict[str, dict[int, float]] = field(default_factory=dict)   # student -> seed -> top1

    @property
    def label(self) -> str:
        return row_label(self.method, self.labels)

    def student_mean(self, student: str) -> float | None:
        seeds = self.by_student.get(student)
        return stats.mean(list(seeds.values())) if seeds else None

    def student_std(self, student: str) -> float | None:
        seeds = self.by_student.get(student)
        return spread(list(seeds.values())) if seeds else None

    def panel_by_seed(self, students: list[str]) -> dict[int, float]:
        """Per seed, the mean over the students that have that seed (all of them, in a full grid)."""
        seeds = set.intersection(*(set(self.by_student.get(s, {})) for s in students)) if students else set()
        return {seed: stats.mean([self.by_student[s][seed] for s in students]) for seed in seeds}


@dataclass
class Summary:
    task: str
    ipc: int | None
    students: list[str]
    rows: list[Row]
    tau_mean: float
    tau_pairs: dict

    def row(self, method: str, labels: str) -> Row | None:
        return next((r for r in self.rows if r.method == method and r.labels == labels), None)

    def delta_vs_random(self, row: Row) -> stats.Interval | None:
        base = self.row(BASELINE, row.labels)
        if base is None or base is row:
            return None
        return stats.paired_difference(row.panel_by_seed(self.students), base.panel_by_seed(self.students))


def verdict(summary: Summary, row: Row) -> str | None:
    """One plain sentence: does `row` beat random real images under the same label protocol
    (its panel mean, paired by seed, 95 % interval)? None for random itself and full data."""
    delta = summary.delta_vs_random(row)
    if delta is None or row.method == "full":
        return None
    if delta.low is None:
        return (f"{row.label}: {delta.mean:+.1f} points vs random real images ({row.labels} labels); "
                f"{delta.n} seed{'' if delta.n == 1 else 's'}, too few for an interval (at least "
                f"{stats.MIN_INTERVAL_VALUES}).")
    if delta.high < 0:
        word = "loses to"
    elif delta.low > 0:
        word = "beats"
    else:
        word = "is not distinguishable from"
    return (f"{row.label} {word} random real images under the same {row.labels} labels "
            f"({delta.mean:+.1f} points, 95 % interval [{delta.low:+.1f}, {delta.high:+.1f}]).")


def summarise(records: list[dict]) -> list[Summary]:
    """One summary per (task, IPC); `full` rows (ipc None) join every IPC's summary of their task."""
    groups: dict[tuple, dict[tuple, Row]] = defaultdict(dict)
    full_rows: dict[str, dict[tuple, Row]] = defaultdict(dict)
    for r in records:
        if is_continual(r):
            continue
        target = full_rows[r["task"]] if r["ipc"] is None else groups[(r["task"], r["ipc"])]
        key = (r["method"], r["labels"])
        row = target.setdefault(key, Row(r["task"], r["ipc"], r["method"], r["labels"]))
        row.by_student.setdefault(r["student"], {})[r["seed"]] = r["top1"]
    if not groups:  # only full-data records
        groups = {(task, None): {} for task in full_rows}
    summaries = []
    for (task, ipc), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        rows = dict(rows)
        rows.update(full_rows.get(task, {}))
        students = sorted({s for row in rows.values() for s in row.by_student}, key=student_order)
        ordered = sorted(rows.values(), key=lambda r: (r.labels != "soft", r.method == "full", r.method))
        soft = [r for r in ordered if r.labels == "soft"]
        rankings = {s: [r.student_mean(s) for r in soft] for s in students
                    if all(r.student_mean(s) is not None for r in soft)}
        tau_mean, pairs = stats.mean_pairwise_tau(rankings) if len(soft) > 1 and len(rankings) > 1 else (math.nan, {})
        summaries.append(Summary(task, ipc, students, ordered, tau_mean, pairs))
    return summaries


def spread(values: list[float]) -> float | None:
    """The sample std over seeds; None from a single seed (no spread to show, not a spread of 0)."""
    return stats.std(values) if len(values) > 1 else None


def fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, the separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def rich_table(summary: Summary) -> Table:
    ipc = "full data only" if summary.ipc is None else f"IPC {summary.ipc}"
    table = Table(title=f"{summary.task}, {ipc}: last-epoch top-1 % (mean ± std over seeds)")
    table.add_column("method")
    for student in summary.students:
        table.add_column(student, justify="right")
    for name in ("panel mean", "worst", "Δ vs random [95% CI]"):
        table.add_column(name, justify="right")
    for row in summary.rows:
        panel = row.panel_by_seed(summary.students)
        means = [row.student_mean(s) for s in summary.students]
        delta = summary.delta_vs_random(row)
        table.add_row(row.label, *[fmt(row.student_mean(s), row.student_std(s)) for s in summary.students],
                      fmt(stats.mean(list(panel.values())) if panel else None),
                      fmt(min(m for m in means if m is not None) if any(m is not None for m in means) else None),
                      str(delta) if delta else "–")
    tau = "n/a" if math.isnan(summary.tau_mean) else f"{summary.tau_mean:+.2f}"
    table.caption = f"Kendall τ between the students' method rankings (soft labels), mean over pairs: {tau}"
    return table
