"""Continual results from records only: the rich summary table, the leaderboard's Markdown rows,
and two PNGs per step count: accuracy vs number of classes seen (one line per memory source and
strategy) and the accuracy matrices. Deterministic: sorted rows, fixed formats, no clock."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.table import Table

from cdabench import stats
from cdabench.records import is_continual
from cdabench.results import published
from cdabench.results.report import md_table


@dataclass
class CurveRow:
    """One (protocol, strategy, memory, masking) line of a scenario, over its seeds."""

    task: str
    steps: int
    ipc: int
    student: str
    protocol: str
    strategy: str
    memory: str
    masked: bool | None
    records: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return row_label(self.protocol, self.strategy, self.memory, self.masked)

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.records]

    def mean(self, key: str) -> float:
        return stats.mean(self.values(key))

    def std(self, key: str) -> float:
        return stats.std(self.values(key))

    def curve(self) -> tuple[list[float], list[float]]:
        """Mean and std over seeds of the seen-class accuracy after each step."""
        columns = list(zip(*(r["seen_accuracy"] for r in self.records)))
        return [stats.mean(list(c)) for c in columns], [stats.std(list(c)) for c in columns]

    def matrix(self) -> list[list[float]]:
        mats = [r["accuracy_matrix"] for r in self.records]
        t = len(mats[0])
        return [[stats.mean([m[i][j] for m in mats]) for j in range(t)] for i in range(t)]

    @property
    def classes_per_step(self) -> int:
        return len(self.records[0]["step_classes"][0])

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for r in self.records})


def row_label(protocol: str, strategy: str, memory: str, masked: bool | None) -> str:
    if protocol == "retrain":
        return f"retrain{'' if masked else ' (unmasked)'} · {memory}"
    if memory == "none":
        return strategy
    if memory == "own-buffer":
        return f"{strategy} (own buffer)"
    return f"{strategy} · {memory}"


def _row_order(row: CurveRow) -> tuple:
    return (row.task, row.steps, row.ipc, row.student, row.protocol != "retrain", row.strategy,
            row.memory, not bool(row.masked))


def group(records: list[dict]) -> list[CurveRow]:
    rows: dict[tuple, CurveRow] = {}
    for r in records:
        if not is_continual(r):
            continue
        key = (r["task"], r["steps"], r["ipc"], r["student"], r["protocol"], r["strategy"], r["memory"], r.get("masked"))
        row = rows.setdefault(key, CurveRow(*key))
        row.records.append(r)
    for row in rows.values():
        row.records.sort(key=lambda r: (r["seed"], r["record_hash"] if "record_hash" in r else ""))
    return sorted(rows.values(), key=_row_order)


def scenarios(rows: list[CurveRow]) -> dict[tuple, list[CurveRow]]:
    by = defaultdict(list)
    for row in rows:
        by[(row.task, row.steps, row.ipc, row.student)].append(row)
    return dict(sorted(by.items()))


def _fmt(mean: float, std: float | None = None, signed: bool = False) -> str:
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if not std else f"{text} ± {std:.1f}"


def _curve_text(row: CurveRow) -> str:
    return " → ".join(f"{v:.1f}" for v in row.curve()[0])


def _bytes(row: CurveRow) -> str:
    total = stats.mean([r["image_bytes"] + r["label_bytes"] for r in row.records])
    return f"{total / 1024:.1f} KiB" if total else "0"


def _masked(row: CurveRow) -> str:
    return "–" if row.masked is None else ("yes" if row.masked else "no")


def _title(task: str, steps: int, ipc: int, student: str, row: CurveRow) -> str:
    return f"{task}: {steps} steps × {row.classes_per_step} classes, memory {ipc} images per class, student {student}"


def rich_table(records: list[dict]) -> list[Table]:
    """One compact table per scenario (the leaderboard's Markdown has every column)."""
    tables = []
    for (task, steps, ipc, student), rows in scenarios(group(records)).items():
        table = Table(title=_title(task, steps, ipc, student, rows[0]), box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column("cell", no_wrap=True)
        table.add_column("seen acc/step", no_wrap=True)
        for name in ("final", "forget", "BWT", "unseen"):
            table.add_column(name, justify="right", no_wrap=True)
        for row in rows:
            label = row.label if row.protocol == "retrain" else f"seq {row.label}"
            final = f"{row.mean('final_accuracy'):.1f}" + (f"±{row.std('final_accuracy'):.1f}" if len(row.records) > 1
                                                          else "")
            table.add_row(label, " ".join(f"{v:.0f}" for v in row.curve()[0]), final, _fmt(row.mean("forgetting")),
                          _fmt(row.mean("bwt"), signed=True), _fmt(row.mean("unseen_accuracy")))
        seeds = sorted({seed for row in rows for seed in row.seeds})
        table.caption = (f"top-1 % (mean over seeds {','.join(map(str, seeds))}); final: all classes after the last "
                         "step; forget: mean drop of old experiences from their best; BWT: final minus just-learned; "
                         "unseen: accuracy on classes not trained on yet (> 0: future-class knowledge leaked in)")
        tables.append(table)
    return tables


MEMORY_ORDER = ("random", "herding", "cda", "sre2l")   # random real images first: the fairness control


def _memory_rank(memory: str) -> tuple:
    return (MEMORY_ORDER.index(memory), "") if memory in MEMORY_ORDER else (len(MEMORY_ORDER), memory)


def _by_seed(row: CurveRow, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in row.records}


def differences(rows: list[CurveRow]) -> list[tuple[str, CurveRow, CurveRow]]:
    """The comparisons a continual page is read for, as (what, a, b) meaning a - b, paired by seed:
    under retrain (masked teacher) each memory against random real images; under each sequential
    strategy that replays a chosen memory, every pair of memories (random real images first)."""
    out = []
    retrain = {row.memory: row for row in rows if row.protocol == "retrain" and row.masked}
    if "random" in retrain:
        out += [("retrain", retrain[m], retrain["random"]) for m in sorted(retrain, key=_memory_rank) if m != "random"]
    by_strategy = defaultdict(dict)
    for row in rows:
        if row.protocol == "sequential" and row.memory not in ("none", "own-buffer"):
            by_strategy[row.strategy][row.memory] = row
    for strategy, memories in sorted(by_strategy.items()):
        names = sorted(memories, key=_memory_rank)
        out += [(strategy, memories[b], memories[a]) for i, a in enumerate(names) for b in names[i + 1:]]
    return out


def difference_rows(rows: list[CurveRow]) -> list[list[str]]:
    """Markdown rows: each difference's final and average incremental accuracy, with a 95 %
    t-interval over seeds where there are enough of them (stats.MIN_INTERVAL_VALUES)."""
    table = []
    for what, a, b in differences(rows):
        final = stats.paired_difference(_by_seed(a, "final_accuracy"), _by_seed(b, "final_accuracy"))
        average = stats.paired_difference(_by_seed(a, "average_incremental_accuracy"),
                                          _by_seed(b, "average_incremental_accuracy"))
        if final is None:
            continue
        seeds = sorted(set(_by_seed(a, "final_accuracy")) & set(_by_seed(b, "final_accuracy")))
        table.append([what, f"{a.memory} − {b.memory}", str(final), str(average), ",".join(map(str, seeds))])
    return table


def published_rows(records: list[dict], published_table: list[dict]) -> list[list[str]]:
    """The published per-step numbers beside ours: the same dataset, steps, IPC, memory, student,
    protocol and masking (the papers' retrain is unmasked); our masked number alongside."""
    out = []
    for p in published_table:
        def measured(masked: bool) -> list[float]:
            return [r["seen_accuracy"][p["step"] - 1] for r in records
                    if is_continual(r) and r["dataset"] == p["dataset"] and r["steps"] == p["steps"]
                    and r["ipc"] == p["ipc"] and r["memory"] == p["method"] and r["protocol"] == p["protocol"]
                    and r["student"] == p["student"] and bool(r.get("masked")) == masked
                    and len(r["seen_accuracy"]) >= p["step"]]
        same, masked = measured(p["masked"]), measured(not p["masked"])
        out.append([str(p["step"]), str(p["classes_seen"]), f"{p['top1']:.1f}",
                    _fmt(stats.mean(same), stats.std(same)) if same else "–", published.status(same, p["top1"]),
                    _fmt(stats.mean(masked), stats.std(masked)) if masked else "–", p["source"]])
    return out


def markdown_section(records: list[dict], published_table: list[dict], figures: list[str] = ()) -> list[str]:
    """The leaderboard's continual section (empty when there is nothing to show)."""
    rows = group(records)
    if not rows and not published_table:
        return []
    lines = ["## Continual learning (class-incremental)", "",
             "Top-1 (%) on the real test images, mean ± std over seeds. **retrain** (the SRe²L/CDA protocol): a "
             "fresh student per step, trained with online KD on the memory of the classes seen so far; *masked* = "
             "the teacher's logits of classes not seen yet are removed (our fix of the papers' leak). "
             "**sequential**: one model through the stream with Avalanche strategies, hard labels. Every memory "
             "holds the same number of images per class. Forgetting: mean drop of each old experience from its "
             "best accuracy; BWT: mean of final minus just-learned accuracy; unseen: accuracy on classes not yet "
             "trained on. See docs/continual.md.", ""]
    for (task, steps, ipc, student), group_rows in scenarios(rows).items():
        lines += [f"### {_title(task, steps, ipc, student, group_rows[0])}", ""]
        table = []
        for row in group_rows:
            name = row.memory + ("" if row.masked else " (unmasked)") if row.protocol == "retrain" else row.label
            table.append([row.protocol, name, _masked(row), _curve_text(row),
                          _fmt(row.mean("final_accuracy"), row.std("final_accuracy")),
                          _fmt(row.mean("average_incremental_accuracy")),
                          _fmt(row.mean("forgetting"), row.std("forgetting")), _fmt(row.mean("bwt"), signed=True),
                          _fmt(row.mean("unseen_accuracy")), str(int(row.mean("num_images"))), _bytes(row),
                          ",".join(map(str, row.seeds))])
        lines += md_table(["protocol", "strategy · memory", "masked", "seen-class accuracy after each step",
                            "final", "avg incremental", "forgetting", "BWT", "unseen", "memory images",
                            "memory bytes (images + labels)", "seeds"], table)
        diffs = difference_rows(group_rows)
        if diffs:
            lines += ["", "Differences between memories, paired by seed (the unit: a seed draws the class order, the "
                      "memories and the training), with a 95 % t-interval where there are at least "
                      f"{stats.MIN_INTERVAL_VALUES} seeds:", ""]
            lines += md_table(["protocol / strategy", "memory difference", "final accuracy Δ [95% CI]",
                               "avg incremental Δ [95% CI]", "seeds"], diffs)
        orders = sorted({tuple(r["class_order"]) for row in group_rows for r in row.records})
        lines += ["", "Class orders (by seed): " + "; ".join(" ".join(map(str, o)) for o in orders) + ".", ""]
    if published_table:
        first = published_table[0]
        lines += [f"### Published continual numbers ({first['method']} {first['protocol']}, {first['dataset']}, "
                  f"{first['steps']} steps, IPC {first['ipc']}) beside ours", "",
                  "The papers' protocol is unmasked; our masked number is shown beside it. Not the same "
                  "protocol in every detail: the official SRe²L continual script trains its students with SGD "
                  "lr 0.5, wd 5e-4 and DSA augmentation, with the teacher left in train mode (a bug); ours use the "
                  "task's post-train recipe (SGD lr 0.2, 5 warm-up epochs, RandomResizedCrop + flip on "
                  "Tiny-ImageNet) with the teacher in eval mode. Its class order is reproduced by the suite "
                  "setting `class_order = \"sre2l-cl\"` (docs/continual.md).", ""]
        lines += md_table(["step", "classes seen", "published", "ours (same protocol)", "status", "ours (masked)",
                            "source"], published_rows(records, published_table)) + [""]
    if figures:
        lines += [f"![{name}]({name})" for name in figures] + [""]
    return lines


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")   # matplotlib's tab10


def _curve_style(row: CurveRow, rows: list[CurveRow]) -> tuple[str, str, str]:
    """A line's colour names its strategy (retrain is one), its marker its memory and its line
    style the protocol (solid retrain, dotted the papers' unmasked retrain, dashed sequential): every
    line of a scenario differs from every other in colour or marker, so no two look alike."""
    strategies = sorted({r.strategy for r in rows}, key=lambda s: (s != "retrain", s))
    memories = sorted({r.memory for r in rows}, key=_memory_rank)
    color = _COLOURS[strategies.index(row.strategy) % len(_COLOURS)]
    marker = _MARKERS[memories.index(row.memory) % len(_MARKERS)]
    line = "--" if row.protocol == "sequential" else ("-" if row.masked else ":")
    return color, marker, line


def draw(task: str, records: list[dict], out: Path, provenance: dict) -> list[str]:
    """Per scenario: accuracy vs classes seen, and the accuracy matrices (mean over seeds)."""
    from cdabench.results import plots  # lazily: matplotlib loads only when plots are drawn
    plt = plots.plt
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for (task_name, steps, ipc, student), rows in scenarios(group(records)).items():
        stem = f"{task}-continual-{steps}steps-ipc{ipc}-{student}"
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for row in rows:
            mean, std = row.curve()
            x = [row.classes_per_step * (i + 1) for i in range(len(mean))]
            color, marker, line = _curve_style(row, rows)
            ax.errorbar(x, mean, yerr=std if any(std) else None, marker=marker, capsize=3, label=row.label,
                        color=color, ls=line, markersize=5)
        ax.set_xlabel("classes seen")
        ax.set_ylabel("top-1 % on the seen classes")
        ax.set_ylim(0, 100)
        ax.set_title(f"{task_name}: {steps} steps, {ipc} images per class, {student}", fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))   # beside the lines, never over them
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        names.append(plots.save_figure(fig, provenance, out, f"{stem}-curves.png"))

        cols = min(4, len(rows))
        nrows = -(-len(rows) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols + 0.6, 2.5 * nrows + 0.5), squeeze=False)
        for k, row in enumerate(rows):
            ax = axes[k // cols][k % cols]
            matrix = row.matrix()
            image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=100)
            if steps <= 10:
                for i, values in enumerate(matrix):
                    for j, v in enumerate(values):
                        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                                color="w" if v < 60 else "k")
            ax.set_title(row.label, fontsize=7)
            ax.set_xticks(range(steps), [str(j + 1) for j in range(steps)], fontsize=6)
            ax.set_yticks(range(steps), [str(i + 1) for i in range(steps)], fontsize=6)
            ax.set_xlabel("test experience", fontsize=6)
            ax.set_ylabel("after step", fontsize=6)
        for k in range(len(rows), nrows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.colorbar(image, ax=axes, shrink=0.8, label="top-1 %")
        fig.suptitle(f"{task_name}: accuracy matrices (mean over seeds)", fontsize=9)
        names.append(plots.save_figure(fig, provenance, out, f"{stem}-matrices.png"))
    return names
