"""The `cdabench` command: distil, evaluate, and list what is available."""
from __future__ import annotations

import argparse
import shlex
import sys

from cdabench import progress


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits", help="task name (tasks/<name>.toml) or path of a task .toml")
    p.add_argument("--data-root", default=None, help="local root of the dataset in its official layout")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache-dir", default=None, help="teachers and label stores (default $CDABENCH_CACHE or ~/.cache/cdabench)")
    p.add_argument("--teacher", default=None, help="a teacher checkpoint (state dict) instead of training one")
    p.add_argument("--quiet", action="store_true", help="no progress output")


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
    e.add_argument("--data", required=True, help="folder written by `cdabench distill`, or any ImageFolder")
    e.add_argument("--student", default="resnet18")
    e.add_argument("--labels", default="soft", choices=("soft", "hard"))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--epochs", type=int, default=None, help="override the task's post-train epochs")
    e.add_argument("--out", required=True, help="folder of records.jsonl")

    sub.add_parser("list", help="tasks, methods, models and datasets")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    progress.set_quiet(getattr(args, "quiet", False))
    command = "cdabench " + " ".join(shlex.quote(a) for a in argv)
    from cdabench.config import ConfigError
    from cdabench.data import DataError
    try:
        return _dispatch(args, command)
    except (ConfigError, DataError, ValueError) as exc:
        progress.console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2


def _dispatch(args, command: str) -> int:
    from cdabench import config
    if args.command == "list":
        from cdabench.data import list_datasets
        from cdabench.models import list_models
        print("tasks:   ", ", ".join(config.list_tasks()))
        print("methods: ", ", ".join(config.list_methods()))
        print("models:  ", ", ".join(list_models()), "(or any timm name)")
        print("datasets:", ", ".join(list_datasets()))
        return 0
    from cdabench.distill.context import open_context
    from cdabench.distill.pipeline import distill, evaluate
    task = config.load_task(args.task)
    ctx = open_context(task, args.data_root, args.device, args.cache_dir)
    if args.command == "distill":
        ipc = args.ipc if args.ipc is not None else task.ipcs[0]
        distill(ctx, args.method, ipc, args.seed, args.out, args.teacher, command)
    elif args.command == "evaluate":
        evaluate(ctx, args.data, args.student, args.labels, args.seed, args.out, args.teacher, command, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
