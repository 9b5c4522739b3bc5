"""PNG figures of a leaderboard (matplotlib, Agg): accuracy vs IPC with the random baseline as a
band, the method x student heatmap of every IPC, accuracy vs total bytes of images + stored labels,
and the training curves of selected cells. Every figure carries its provenance in a footer."""
from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cdabench import artifacts, stats  # noqa: E402
from cdabench.results import report

METADATA = {"Software": None}  # no version/date stamp inside the PNG


def save_figure(fig, provenance: dict, out: Path, name: str) -> str:
    """The figure with its provenance footer, written atomically as out/name; returns name."""
    text = (f"{provenance['records']} records, hash {provenance['hash']}; {'; '.join(provenance['versions'])}; "
            f"{'; '.join(provenance['devices'])}")
    fig.text(0.01, 0.005, text, fontsize=6, color="0.4", ha="left", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata=METADATA)
    plt.close(fig)
    artifacts.atomic_write_bytes(out / name, buf.getvalue())
    return name


def _finish_line_plot(fig, ax, title: str, legend_size: int, provenance: dict, out: Path, name: str) -> str:
    ax.set_ylabel("top-1 % (all students and seeds)")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the provenance footer
    return save_figure(fig, provenance, out, name)


def accuracy_vs_ipc(task: str, rows: list[dict], out: Path, provenance: dict) -> str:
    """Panel-mean accuracy per method and IPC; random real images as a band (mean ± std over seeds)."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["labels"] == "soft" and r["ipc"] is not None and report.augmentation(r) == "on":
            by[r["method"]][r["ipc"]].append(r["top1"])
    fig, ax = plt.subplots(figsize=(6, 4))
    if "random" in by:
        ipcs = sorted(by["random"])
        m = [stats.mean(by["random"][i]) for i in ipcs]
        s = [stats.std(by["random"][i]) for i in ipcs]
        lo, hi = [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)]
        if len(ipcs) == 1:
            ax.axhspan(lo[0], hi[0], color="0.85", label="random (± std)")
        else:
            ax.fill_between(ipcs, lo, hi, color="0.85", label="random (± std)")
    for method in sorted(k for k in by if k != "random"):
        ipcs = sorted(by[method])
        ax.errorbar(ipcs, [stats.mean(by[method][i]) for i in ipcs], yerr=[stats.std(by[method][i]) for i in ipcs],
                    marker="o", capsize=3, label=method)
    full = [r["top1"] for r in rows if r["ipc"] is None and r["labels"] == "soft" and report.augmentation(r) == "on"]
    if full:
        ax.axhline(stats.mean(full), color="k", ls="--", lw=1, label="full data")
    ax.set_xticks(sorted({i for m in by.values() for i in m}))
    ax.set_xlabel("images per class")
    return _finish_line_plot(fig, ax, f"{task}: accuracy vs IPC (soft labels)", 8, provenance,
                             out, f"{task}-accuracy-vs-ipc.png")


def heatmap(task: str, summary: report.Summary, out: Path, provenance: dict) -> str:
    """The method x student matrix of one IPC (mean over seeds)."""
    labels = [r.label for r in summary.rows]
    values = [[r.student_mean(s) if r.student_mean(s) is not None else float("nan") for s in summary.students]
              for r in summary.rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(summary.students), 0.9 + 0.45 * len(labels)))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=100)
    ax.set_xticks(range(len(summary.students)), summary.students, rotation=20, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    fig.colorbar(image, ax=ax, label="top-1 %")
    ipc = "full data" if summary.ipc is None else f"IPC {summary.ipc}"
    ax.set_title(f"{task}, {ipc}: method × student", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    name = f"{task}-heatmap-{'full' if summary.ipc is None else f'ipc{summary.ipc}'}.png"
    return save_figure(fig, provenance, out, name)


def accuracy_vs_bytes(task: str, rows: list[dict], out: Path, provenance: dict) -> str:
    by = defaultdict(list)
    for r in rows:
        label = report.row_label(r["method"], r["labels"], report.augmentation(r))
        by[(label, r["ipc"])].append((r["image_bytes"] + r["label_bytes"], r["top1"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, ipc), points in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        size = stats.mean([p[0] for p in points])
        acc = [p[1] for p in points]
        ax.errorbar([size], [stats.mean(acc)], yerr=[stats.std(acc)], marker="o", capsize=3,
                    label=f"{label} ({'full' if ipc is None else f'IPC {ipc}'})")
    ax.set_xscale("log")
    ax.set_xlabel("bytes of images + stored labels")
    return _finish_line_plot(fig, ax, f"{task}: accuracy vs storage", 7, provenance,
                             out, f"{task}-accuracy-vs-bytes.png")


def curves(task: str, picked: list[tuple[dict, dict]], out: Path, provenance: dict) -> str:
    """Per selected cell (record, curve): mean training loss, learning rate and held-out top-1 by epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for record, curve in picked:
        epochs = curve["epochs"]
        label = record.get("cell") or curve.get("name")
        x = [e["epoch"] for e in epochs]
        line, = axes[0].plot(x, [e["loss"] for e in epochs], lw=1, label=label)
        axes[1].plot(x, [e["lr"] for e in epochs], lw=1, color=line.get_color())
        held = [(e["epoch"], e["heldout_top1"]) for e in epochs if e.get("heldout_top1") is not None]
        axes[2].plot([p[0] for p in held], [p[1] for p in held], marker="o", lw=1, color=line.get_color())
    for ax, title in zip(axes, ("mean training loss", "learning rate (last step of the epoch)", "held-out top-1 %")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{task}: training curves of {len(picked)} cell(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    name = f"{task}-curves.png"
    return save_figure(fig, provenance, out, name)


def draw_task(task: str, rows: list[dict], summaries: list[report.Summary], out: Path, provenance: dict) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [accuracy_vs_ipc(task, rows, out, provenance),
            *(heatmap(task, summary, out, provenance) for summary in summaries),
            accuracy_vs_bytes(task, rows, out, provenance)]
