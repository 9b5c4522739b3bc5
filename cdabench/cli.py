"""The `cdabench` command: distil, evaluate, and list what is available."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from cdabench import config, packaged, progress, records
from cdabench.config import ConfigError
from cdabench.data import DataError, list_datasets
from cdabench.distill.formats import detect_format, list_formats
from cdabench.distill.sets import adhoc_method, distill
from cdabench.engine.context import open_context
from cdabench.engine.models import list_models
from cdabench.engine.runtime import launched_world, resolve_device
from cdabench.engine.watch import DEFAULT_CURVE_POINTS, LOGGERS, Watch, check_loggers
from cdabench.evaluate.posttrain import LABEL_PROTOCOLS, evaluate
from cdabench.harness.lock import FolderInUse
from cdabench.harness.run import STAGES, run_suite
from cdabench.harness.shards import parse_shard
from cdabench.harness.suites import list_suites, load_suite, suite_kind
from cdabench.results import doubling, report
from cdabench.results.check import compare, read_targets
from cdabench.results.continual import rich_table as continual_tables
from cdabench.results.leaderboard import generate, load_runs


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits", help="task name (`cdabench list`) or path of a task .toml")
    p.add_argument("--data-root", default=None, help="local root of the dataset in its official layout")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                   help="autocast of every forward pass (default: the task's; fp32 on the papers' tasks); "
                        "recorded in every record")
    p.add_argument("--cache-dir", default=None, help="teachers and label stores (default $CDABENCH_CACHE or ~/.cache/cdabench)")
    p.add_argument("--teacher", default=None, help="a teacher checkpoint (state dict) instead of training one")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _holdout_args(p)


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-points", type=int, default=DEFAULT_CURVE_POINTS, metavar="N",
                   help="held-out top-1 evaluations spread over each cell's epochs, kept in its curve file beside the "
                        f"records (default {DEFAULT_CURVE_POINTS}; the last epoch always; 0: the last only)")
    p.add_argument("--log", nargs="+", default=[], choices=LOGGERS, metavar="LOGGER",
                   help="also log every cell as one run: tensorboard (event files in <out>/tensorboard/) and/or wandb "
                        "(W&B offline mode, files in <out>/wandb/; nothing leaves the machine). Needs "
                        "pip install 'cdabench[loggers]'")


def _holdout_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--holdout-per-class", type=int, default=None, metavar="N",
                       help="held-out real images per class (overrides the task's held-out split; e.g. for a "
                            "dataset with fewer images per class than the task expects)")
    group.add_argument("--holdout-fraction", type=float, default=None, metavar="F",
                       help="held-out fraction of each class's images (overrides the task's held-out split)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdabench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="produce a distilled set (cda, sre2l) or a baseline subset")
    _common(d)
    d.add_argument("--method", default="cda")
    d.add_argument("--ipc", type=int, default=None, help="images per class (default: the task's first IPC)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)

    e = sub.add_parser("evaluate", help="post-train a student on a distilled set; append a record")
    _common(e)
    e.add_argument("--data", required=True,
                   help="folder written by `cdabench distill`, any ImageFolder, another method's set (a tensor file or "
                        "folder: see --format), or a method entry (.toml) naming one (docs/bring-your-own.md)")
    e.add_argument("--format", default=None,
                   help="how the set is stored: auto (detected from the path) or one of " + ", ".join(list_formats()))
    e.add_argument("--space", default=None, choices=("pixel", "normalized", "zca"),
                   help="the value space of a tensor set: pixel ([0, 1]), normalized (the task's mean/std; another "
                        "method's constants go in a method entry) or zca (kornia ZCAWhitening, eps 0.1)")
    e.add_argument("--fkd", default=None, metavar="DIR",
                   help="the method's FKD soft-label directory (epoch_<e>/batch_<b>.tar) for an image-folder set")
    e.add_argument("--student", default=None,
                   help="a model name (`cdabench list`; default: the first student of the task's panel, resnet18 on "
                        "the papers' tasks)")
    e.add_argument("--labels", default="soft", choices=LABEL_PROTOCOLS,
                   help="soft: our teacher relabels (the task's protocol); hard: class labels; method: an external "
                        "set's own labels (its logits, FKD directory or class indices) and learned learning rate")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--epochs", type=int, default=None, help="override the task's post-train epochs")
    e.add_argument("--out", required=True, help="folder of records.jsonl")
    e.add_argument("--allow-label-mismatch", action="store_true",
                   help="evaluate a folder whose labels the teacher does not agree with (deliberately mislabelled "
                        "data); the agreement is still recorded")
    e.add_argument("--no-augment", action="store_true",
                   help="train the student without its augmentation (recorded; the augmentation share, docs/suites.md)")
    _watch_args(e)

    r = sub.add_parser("run", help="run a suite (a grid of method x IPC x student x labels x seed)")
    _suite_args(r)
    r.add_argument("--out", default=None, help="run folder (default runs/<suite>)")
    r.add_argument("--stages", default="all", choices=STAGES,
                   help="shared: make the teacher and every distilled set, run no cell (the first job of a "
                        "Slurm recipe; README)")
    r.add_argument("--shard", default=None, metavar="I/N|slurm",
                   help="run only the cells dealt to shard I of N (one job of an array; the shared stages must "
                        "exist), into <out>/shards/; slurm: this array task's shard (SLURM_ARRAY_TASK_ID, "
                        "SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT). A later plain run merges the shards' records")
    r.add_argument("--remeasure", action="store_true",
                   help="measure again the cells the folder holds with another cell key (an edited task; another "
                        "machine's float path belongs in its own --out); tables count each cell's latest record")

    c = sub.add_parser("check", help="run a suite and compare its cells with committed targets")
    _suite_args(c)
    c.add_argument("--out", default=None, help="run folder (default runs/<suite>)")
    c.add_argument("--targets", default=None,
                   help="targets CSV (default: the committed targets shipped with the package)")
    c.add_argument("--records", default=None, help="compare the records in this folder instead of running the suite")

    lb = sub.add_parser("leaderboard", help="Markdown/CSV/PNG leaderboards from records")
    lb.add_argument("--runs", nargs="+", required=True, help="run folders (or records.jsonl files)")
    lb.add_argument("--out", default="leaderboards")
    lb.add_argument("--no-plots", action="store_true")
    lb.add_argument("--curves", nargs="+", default=None, metavar="PATTERN",
                    help="draw the curves (loss, lr, held-out top-1 per epoch) of the cells whose name matches a "
                         "pattern (fnmatch, e.g. 'cda/ipc10/*' or '*/resnet18/soft/seed0') into <task>-curves.png")

    db = sub.add_parser("doubling", help="the doubling test of convergence: a run against the same grid with every "
                                         "post-train epoch count (or the recover iterations) doubled")
    db.add_argument("--base", nargs="+", required=True, help="the run's folders (or records.jsonl files)")
    db.add_argument("--doubled", nargs="+", required=True, help="the doubled run's folders (or records.jsonl files)")
    db.add_argument("--metric", default="heldout_top1", choices=("heldout_top1", "top1"),
                    help="held-out top-1 (default: schedules are chosen on the held-out split) or test top-1")
    db.add_argument("--panel-limit", type=float, default=doubling.PANEL_LIMIT,
                    help="the most a row's panel mean may move (points; exit 1 beyond)")
    db.add_argument("--student-limit", type=float, default=doubling.STUDENT_LIMIT,
                    help="the most a student's mean over seeds may move (points; exit 1 beyond)")

    sub.add_parser("list", help="tasks, methods, models, datasets and suites")
    return parser


def _suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="suite name (`cdabench list`) or path of a suite .toml")
    p.add_argument("--task", default=None, help="override the suite's task")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--ipc", nargs="+", type=int, default=None)
    p.add_argument("--students", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", nargs="+", type=int, default=None,
                   help="continual suites: the numbers of class-incremental steps (e.g. 5 10)")
    p.add_argument("--strategies", nargs="+", default=None,
                   help="continual suites: the sequential strategies (naive replay gdumb lwf ewc der er_ace)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                   help="autocast of every forward pass (default: the task's; fp32 on the papers' tasks); "
                        "recorded in every record")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    _holdout_args(p)
    _watch_args(p)
    p.add_argument("--workers", default="auto",
                   help="cells at once (any suite kind): N processes of (threads / N) threads, dealt round-robin over the "
                        "visible GPUs; auto = one per visible GPU (one per rank under torchrun), 2 on a CPU with "
                        ">= 2 threads (docs/suites.md)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    progress.set_quiet(getattr(args, "quiet", False))
    command = "cdabench " + " ".join(shlex.quote(a) for a in argv)
    try:
        with _exit_on_sigterm():
            return _dispatch(args, command)
    except (ConfigError, DataError, ValueError, FileNotFoundError, FolderInUse) as exc:
        progress.console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2


def _dispatch(args, command: str) -> int:
    if args.command == "list":
        print("tasks:   ", ", ".join(config.list_tasks()))
        print("methods: ", ", ".join(config.list_methods()))
        print("models:  ", ", ".join(list_models()), "(or any timm name)")
        print("datasets:", ", ".join(list_datasets()))
        print("formats: ", ", ".join(list_formats()), "(evaluate --format; docs/bring-your-own.md)")
        print("external method examples (copy one beside your set):", packaged.builtin("external"))
        print("suites:  ", ", ".join(list_suites()))
        return 0
    if args.command == "leaderboard":
        for path in generate(args.runs, args.out, plots=not args.no_plots, curves=args.curves):
            print(path)
        return 0
    if args.command == "doubling":
        rows = doubling.doubling(load_runs(args.base)[0], load_runs(args.doubled)[0], args.metric)
        if not rows:
            raise ValueError("the two runs share no cell (the same task, IPC, method, labels, student and seed)")
        print("\n".join(doubling.markdown(rows, args.panel_limit, args.student_limit)))
        return 0 if doubling.converged(rows, args.panel_limit, args.student_limit) else 1
    if args.command in ("run", "check"):
        return _run_or_check(args, command)
    task = config.with_holdout(config.load_task(args.task), args.holdout_per_class, args.holdout_fraction)
    ctx = open_context(task, args.data_root, args.device, args.cache_dir, args.precision)
    if args.command == "distill":
        ipc = args.ipc if args.ipc is not None else task.ipcs[0]
        distill(ctx, args.method, ipc, args.seed, args.out, args.teacher, command)
    elif args.command == "evaluate":
        check_loggers(args.log)
        watch = Watch(args.curve_points, tuple(args.log), str(args.out))
        student = args.student or task.panel[0]
        record = evaluate(ctx, args.data, student, args.labels, args.seed, args.teacher, command, args.epochs,
                          allow_label_mismatch=args.allow_label_mismatch, method=_external_method(args),
                          augment=not args.no_augment, watch=watch)
        if ctx.group.is_main:  # under torchrun every rank holds the record; one appends it
            key = records.record_id({k: v for k, v in record.items() if k != "curve"})
            record = records.write_curve(Path(args.out), key, record)
            records.append_record(Path(args.out) / "records.jsonl", record)
            progress.log(f"{record['method']} ipc {record['ipc']} {record['student']} {record['labels']}: "
                         f"top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}% "
                         f"({record['seconds']['posttrain']:.1f}s) -> {Path(args.out) / 'records.jsonl'}")
    return 0


def _external_method(args):
    """The external method `evaluate --data` names: a method entry (.toml), or a set given with
    --format/--space/--fkd or as a file; None for our folders and plain ImageFolders."""
    if args.data.endswith(".toml"):
        method = config.load_method(args.data)
        if method.kind != "external":
            raise ConfigError(f"{args.data} is a {method.kind} method, not an external set: run `cdabench distill` for it")
        return method
    data = Path(args.data)
    if args.format or args.space or args.fkd or data.is_file() or (data.is_dir() and detect_format(data) != "imagefolder"):
        return adhoc_method(args.data, args.format, args.space, args.fkd)
    return None


def _run_or_check(args, command: str) -> int:
    suite = load_suite(args.suite)
    suite = suite_kind(suite).narrow(suite, args.task, args.ipc, args.students, args.seeds, args.methods, args.steps,
                                     args.strategies)
    if args.command == "check" and suite.kind != "cross-arch":
        raise ConfigError(f"{suite.kind} suites have no regression targets: use `cdabench run --suite {args.suite}`")
    out = Path(args.out or f"runs/{suite.name}")
    if args.command == "check" and args.records:
        results, duplicates = records.unique_cells(records.read_records(Path(args.records) / "records.jsonl"))
        if duplicates:
            print(f"{args.records}: {records.describe_left_out(results, duplicates)}")
    else:
        shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
        results = run_suite(suite, out, args.data_root, args.device, args.cache_dir, command,
                            workers=_workers(args.workers, args.device), precision=args.precision,
                            holdout=(args.holdout_per_class, args.holdout_fraction), shard=shard,
                            stages=getattr(args, "stages", "all"), watch=Watch(args.curve_points, tuple(args.log), str(out)),
                            remeasure=args.command == "check" or args.remeasure)  # check: this tree's cells
    tables = continual_tables([r for r in results if records.is_continual(r)])
    summaries = report.summarise(results)
    tables += [report.rich_table(s) for s in summaries]
    tables += [t for t in (report.rich_scores_table(s) for s in summaries) if t is not None]
    for table in tables:
        progress.console.print(table)
    if args.command == "run":
        return 0
    statuses = compare(results, read_targets(args.targets))
    for s in statuses:
        t = s.target
        measured = "missing" if s.measured is None else f"{s.measured:.2f}"
        print(f"{s.status.upper():9} {t.task} {t.method} {'full' if t.ipc is None else f'ipc{t.ipc}'} {t.student} "
              f"{t.labels}{'' if t.metric == 'top1' else ' ' + t.metric}: {measured} vs target {t.target_top1:.2f} {'±' if t.sides == 2 else '-'} {t.tolerance:.2f}")
    failed = sum(s.failed for s in statuses)
    print(f"{len(statuses) - failed} passed, {failed} failed")
    return 1 if failed else 0


@contextmanager
def _exit_on_sigterm():
    """SIGTERM (a scheduler's time limit or scancel) ends the command as an exception would, so a
    run releases its folder's lock and stops its workers; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _workers(value: str, device: str) -> int:
    """auto: one worker per visible GPU without torchrun (each pinned to its own, see
    runtime.worker_devices), one per rank under torchrun (the ranks are the scale-out), and
    min(2, threads) single-thread processes on a CPU (docs/suites.md)."""
    if value == "auto":
        if resolve_device(device).type == "cuda":
            return torch.cuda.device_count() if launched_world() == 1 else 1
        return min(2, torch.get_num_threads())
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"--workers must be auto or a positive number, got {value!r}")
    return int(value)


if __name__ == "__main__":
    sys.exit(main())
