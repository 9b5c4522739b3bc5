"""Watching a cell while it trains: which epochs get a held-out evaluation (the cell's curve), and
the optional experiment loggers, one run per cell.

A `Watch` is how a command was asked to watch its cells (`--curve-points`, `--log`); it changes
nothing a result depends on (a held-out evaluation in the middle of training draws no random
number and leaves BatchNorm's statistics alone), so it is in no cache key.

Loggers: `tensorboard` writes event files under <run folder>/tensorboard/<run name>/ with
torch.utils.tensorboard (the writer Avalanche's TensorboardLogger uses too); `wandb` logs in W&B's
offline mode only (WANDB_MODE=offline, its files under <run folder>/wandb/: nothing leaves the
machine; `wandb sync` is the user's choice). Neither package is a core dependency: a missing one
is a ConfigError naming the extra that installs it (`pip install 'cdabench[loggers]'`).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cdabench.config import ConfigError

LOGGERS = ("tensorboard", "wandb")
EXTRA = "loggers"
DEFAULT_CURVE_POINTS = 3
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


@dataclass(frozen=True)
class Watch:
    """`curve_points`: held-out top-1 evaluations spread over a cell's epochs (the last epoch always
    has one: the record's). `loggers`: names from LOGGERS. `log_dir`: the run folder the loggers
    write under (the harness sets it to the suite's --out)."""

    curve_points: int = DEFAULT_CURVE_POINTS
    loggers: tuple[str, ...] = ()
    log_dir: str | None = None

    def __post_init__(self):
        if self.curve_points < 0:
            raise ConfigError(f"--curve-points must be >= 0, got {self.curve_points}")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ConfigError(f"unknown logger(s) {', '.join(unknown)}: use {', '.join(LOGGERS)}")


def curve_epochs(epochs: int, points: int) -> set[int]:
    """The epochs (1-based) whose held-out top-1 is measured: `points` spread evenly, always the last."""
    return {max(1, round(k * epochs / points)) for k in range(1, points + 1)} | {epochs} if points else {epochs}


def require(name: str):
    """The logger's module, or a ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        package = "tensorboard" if name == "tensorboard" else "wandb"
        raise ConfigError(f"--log {name} needs the {package} package, which is not installed ({exc}): "
                          f"pip install 'cdabench[{EXTRA}]'") from exc


def check_loggers(names) -> None:
    """Fail before any work when a requested logger's package is missing."""
    for name in names:
        require(name)


def offline_wandb_env(log_dir: str | Path) -> dict[str, str]:
    """The environment W&B runs under: offline, silent, and every folder it writes (its runs, its
    cache, its settings, its service's logs) inside <log_dir>/wandb (W&B puts its runs in
    $WANDB_DIR/wandb/offline-run-*)."""
    base = Path(log_dir) / "wandb"
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(log_dir),
            "WANDB_CACHE_DIR": str(base / ".cache"), "WANDB_CONFIG_DIR": str(base / ".config"),
            "WANDB_DATA_DIR": str(base / ".data"), "WANDB_ARTIFACT_DIR": str(base / ".artifacts")}


def wandb_init_kwargs(wandb, log_dir: str | Path, name: str, config: dict) -> dict:
    """wandb.init's arguments for one cell: offline, no code, git or system-metrics capture (a
    cell's cost must not grow with what the machine runs), a fresh run even in a process that ran
    another cell before."""
    os.environ.update(offline_wandb_env(log_dir))  # W&B's service process reads them when it starts
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(mode="offline", console="off", save_code=False, disable_git=True,
                              x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
                              x_save_requirements=False)
    return {"project": "cdabench", "name": name, "group": name.split("/")[0], "config": config,
            "dir": os.environ["WANDB_DIR"], "mode": "offline", "reinit": "create_new", "settings": settings}


class RunLogger:
    """One cell's run in every requested logger: scalars by step, a text once, a summary at the end."""

    def __init__(self, watch: Watch, name: str, config: dict):
        if watch.log_dir is None:
            raise ConfigError("loggers need a folder to write in (the run folder)")
        self.writers, self.runs = [], []
        for kind in watch.loggers:
            module = require(kind)
            if kind == "tensorboard":
                writer = module.SummaryWriter(str(Path(watch.log_dir) / "tensorboard" / name))
                writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")
                self.writers.append(writer)
            else:
                self.runs.append(module.init(**wandb_init_kwargs(module, watch.log_dir, name, config)))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for writer in self.writers:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
        for run in self.runs:
            run.log(dict(scalars), step=step)

    def finish(self, step: int, scalars: dict[str, float] | None = None) -> None:
        if scalars:
            self.log(step, scalars)
        for writer in self.writers:
            writer.close()
        for run in self.runs:
            for tag, value in (scalars or {}).items():
                run.summary[tag] = value
            run.finish()
        self.writers, self.runs = [], []


def open_run(watch: Watch | None, name: str, config: dict) -> RunLogger | None:
    """A RunLogger when `watch` asks for loggers, else None."""
    if watch is None or not watch.loggers:
        return None
    return RunLogger(watch, name, config)
