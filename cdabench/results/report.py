"""Summaries computed from records only: per method and student the mean ± std over seeds, the
panel mean and worst case, the gain over `random` under the same label protocol with a 95 %
interval, and Kendall's tau between the students' method rankings; and per method what the
images add beside the labels and the augmentation (`image_scores`: the hard-label recovery and
the augmentation share, docs/suites.md)."""
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


def augmentation(record: dict) -> str:
    """"on" (the task's student augmentation, the protocol of every record before the field
    existed) or "off" (a `no_augment_methods` cell)."""
    return record.get("augmentation") or "on"


def row_label(method: str, labels: str, augment: str = "on") -> str:
    """soft: the plain name; hard / method (an external set's own labels) and the augmentation
    turned off: named in brackets."""
    notes = [n for n, shown in ((labels, labels != "soft"), ("no aug", augment != "on")) if shown]
    return f"{method} ({', '.join(notes)})" if notes else method


@dataclass
class Row:
    task: str
    ipc: int | None
    method: str
    labels: str
    by_student: dict[str, dict[int, float]] = field(default_factory=dict)   # student -> seed -> top1
    augment: str = "on"

    @property
    def label(self) -> str:
        return row_label(self.method, self.labels, self.augment)

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

    def row(self, method: str, labels: str, augment: str = "on") -> Row | None:
        return next((r for r in self.rows if r.method == method and r.labels == labels and r.augment == augment), None)

    def delta_vs_random(self, row: Row) -> stats.Interval | None:
        """Δ vs random: random real images under the same label protocol and augmentation."""
        base = self.row(BASELINE, row.labels, row.augment)
        if base is None or base is row:
            return None
        return stats.paired_difference(row.panel_by_seed(self.students), base.panel_by_seed(self.students))


def verdict(summary: Summary, row: Row) -> str | None:
    """One plain sentence: does `row` beat random real images under the same label protocol
    (its panel mean, paired by seed, 95 % interval)? None for random itself and full data."""
    delta = summary.delta_vs_random(row)
    if delta is None or row.method == "full":
        return None
    protocol = f"{row.labels} labels" + (" without augmentation" if row.augment != "on" else "")
    if delta.low is None:
        return (f"{row.label}: {delta.mean:+.1f} points vs random real images ({protocol}); "
                f"{delta.n} seed{'' if delta.n == 1 else 's'}, too few for an interval (at least "
                f"{stats.MIN_INTERVAL_VALUES}).")
    if delta.high < 0:
        word = "loses to"
    elif delta.low > 0:
        word = "beats"
    else:
        word = "is not distinguishable from"
    return (f"{row.label} {word} random real images under the same {protocol} "
            f"({delta.mean:+.1f} points, 95 % interval [{delta.low:+.1f}, {delta.high:+.1f}]).")


def summarise(records: list[dict]) -> list[Summary]:
    """One summary per (task, IPC); `full` rows (ipc None) join every IPC's summary of their task."""
    groups: dict[tuple, dict[tuple, Row]] = defaultdict(dict)
    full_rows: dict[str, dict[tuple, Row]] = defaultdict(dict)
    for r in records:
        if is_continual(r):
            continue
        target = full_rows[r["task"]] if r["ipc"] is None else groups[(r["task"], r["ipc"])]
        key = (r["method"], r["labels"], augmentation(r))
        row = target.setdefault(key, Row(r["task"], r["ipc"], r["method"], r["labels"], augment=augmentation(r)))
        row.by_student.setdefault(r["student"], {})[r["seed"]] = r["top1"]
    if not groups:  # only full-data records
        groups = {(task, None): {} for task in full_rows}
    summaries = []
    for (task, ipc), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        rows = dict(rows)
        rows.update(full_rows.get(task, {}))
        students = sorted({s for row in rows.values() for s in row.by_student}, key=student_order)
        ordered = sorted(rows.values(), key=lambda r: (r.labels != "soft", r.augment != "on", r.method == "full",
                                                       r.method))
        soft = [r for r in ordered if r.labels == "soft" and r.augment == "on"]
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


# ------------------------------------------------------------------ what the images add
SCORE_NAMES = ("delta_soft", "delta_hard", "hard_label_recovery", "delta_soft_no_augment", "augmentation_share")
SCORE_HEADERS = ("Δ vs random", "Δ vs random (hard)", "hard-label recovery", "Δ vs random, aug off",
                 "augmentation share")
SHORT_HEADERS = ("Δ vs random", "Δ (hard)", "hard-label recovery", "Δ (aug off)", "aug share")   # a terminal's 80 columns
FULL = "full"


@dataclass
class ImageScores:
    """Per method and IPC, each a paired-by-seed panel mean with its 95 % t-interval (None where a
    cell it needs is missing). Points of top-1 (docs/suites.md):
    delta_soft / delta_hard: the method minus random real images, soft / hard labels (Δ vs random);
    hard_label_recovery: full data minus the method, both with hard labels (lower: the images alone
    recover more of the full data);
    delta_soft_no_augment: Δ vs random (soft labels) with the student's augmentation off;
    augmentation_share: delta_soft minus delta_soft_no_augment, per seed (the part of the gain over
    random that only exists with augmentation)."""

    method: str
    delta_soft: stats.Interval | None
    delta_hard: stats.Interval | None
    hard_label_recovery: stats.Interval | None
    delta_soft_no_augment: stats.Interval | None
    augmentation_share: stats.Interval | None

    def values(self) -> list[stats.Interval | None]:
        return [getattr(self, name) for name in SCORE_NAMES]


def _difference_of_deltas(summary: Summary, method: str) -> stats.Interval | None:
    """(method − random) with augmentation minus (method − random) without it, seed by seed."""
    panels = [summary.row(m, "soft", aug) for m in (method, BASELINE) for aug in ("on", "off")]
    if any(p is None for p in panels):
        return None
    on, base_on, off, base_off = (p.panel_by_seed(summary.students) for p in panels)
    seeds = sorted(set(on) & set(base_on) & set(off) & set(base_off))
    if not seeds:
        return None
    return stats.t_interval([(on[s] - base_on[s]) - (off[s] - base_off[s]) for s in seeds])


def _delta(summary: Summary, method: str, labels: str, augment: str = "on") -> stats.Interval | None:
    row = summary.row(method, labels, augment)
    return summary.delta_vs_random(row) if row is not None else None


def _hard_label_recovery(summary: Summary, method: str) -> stats.Interval | None:
    full, hard = summary.row(FULL, "hard"), summary.row(method, "hard")
    if full is None or hard is None:
        return None
    return stats.paired_difference(full.panel_by_seed(summary.students), hard.panel_by_seed(summary.students))


def image_scores(summary: Summary) -> list[ImageScores]:
    """What the images add, per method of the summary (full data excluded: it is the reference)."""
    methods = sorted({r.method for r in summary.rows if r.method != FULL}, key=lambda m: (m == BASELINE, m))
    return [ImageScores(m, _delta(summary, m, "soft"), _delta(summary, m, "hard"), _hard_label_recovery(summary, m),
                        _delta(summary, m, "soft", "off"),
                        _difference_of_deltas(summary, m) if m != BASELINE else None) for m in methods]


def has_image_scores(summary: Summary) -> bool:
    """Whether the suite ran the cells of a new score (full with hard labels, or augmentation off)."""
    return any(s.hard_label_recovery is not None or s.delta_soft_no_augment is not None
               for s in image_scores(summary))


def fmt_interval(value: stats.Interval | None) -> str:
    return str(value) if value is not None else "–"


def rich_scores_table(summary: Summary) -> Table | None:
    """The terminal table of `image_scores` (None when the suite ran none of their cells)."""
    if not has_image_scores(summary):
        return None
    ipc = "full data only" if summary.ipc is None else f"IPC {summary.ipc}"
    table = Table(title=f"{summary.task}, {ipc}: what the images add (panel mean, paired by seed, 95% CI, points)")
    table.add_column("method")
    for name in SHORT_HEADERS:
        table.add_column(name, justify="right")
    for score in image_scores(summary):
        table.add_row(score.method, *[fmt_interval(v) for v in score.values()])
    table.caption = ("Δ: vs random real images under the same labels and augmentation; hard-label recovery = "
                     "full (hard) − method (hard), lower is better; aug share = Δ vs random − Δ (aug off)")
    return table
