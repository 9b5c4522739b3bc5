"""Task and method configuration: dataclasses loaded from TOML and validated once, at the edge.

A task (cdabench/builtin/tasks/<name>.toml, or any task file passed by path) is a dataset + splits,
a teacher recipe, the recover settings per method, the IPC values and the post-train protocol. A
method is `cda` (built in) or a baseline (cdabench/builtin/baselines/<name>.toml, or a path).
Unknown keys are errors that list the known ones.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from cdabench import packaged
from cdabench.augment import AugmentSpec
from cdabench.distill.crop_schedule import CropSchedule
from cdabench.distill.recover import RecoverConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    pass


def build(cls, data: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from a TOML table, nested dataclasses included; unknown keys fail."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kind = _NESTED.get((cls, name))
        if kind is dict:
            value = {k: build(_DICT_VALUE[(cls, name)], v, f"{where}.{name}.{k}") for k, v in value.items()}
        elif kind is not None:
            value = build(kind, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class TrainRecipe:
    """How a model is trained: the teacher on real data, or a student on a distilled set."""

    model: str = "resnet18"
    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"              # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_matrices_only: bool = False   # weight decay only on parameters with ndim > 1 (the ImageNet recipe)
    warmup_epochs: int = 0              # linear warm-up from warmup_start x lr
    warmup_start: float = 0.01
    schedule: str = "cosine"            # cosine (per step, to 0) | constant
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    patch_size: int | None = None       # ViTs only: the patch size (None: the registry's choice for the size)
    # ResNets only: zero-initialise the last BN gamma of every block (torchvision's option of this
    # name). Off = torchvision's default init, the official models'; the digits tasks turn it on.
    zero_init_residual: bool = False

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")


@dataclass(frozen=True)
class StudentOverride:
    """Per-student settings of the post-train protocol (tuned on the held-out split, never on test)."""

    epochs: int | None = None
    full_epochs: int | None = None      # this student's epochs on the `full` baseline (over the task's)
    full_batch_size: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    augment: AugmentSpec | None = None
    patch_size: int | None = None


@dataclass(frozen=True)
class KDConfig:
    """Soft labels: `online` (the teacher labels every augmented batch) or `stored` (FKD-style
    label store, generated once and replayed); loss KL(student/T || teacher/T), x T^2 if asked."""

    mode: str = "online"
    temperature: float = 4.0
    t_squared: bool = True
    topk: int = 0                       # stored mode: keep only the top-k logits (0 = all)

    def __post_init__(self):
        if self.mode not in ("online", "stored"):
            raise ValueError(f"kd mode must be online or stored, got {self.mode!r}")


@dataclass(frozen=True)
class PostTrain:
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    kd: KDConfig = field(default_factory=KDConfig)
    students: dict[str, StudentOverride] = field(default_factory=dict)
    # The `full` baseline's epochs; None = the same epochs as every other method. A task may set the
    # same number of optimiser steps instead (equal compute), when equal epochs over the whole real
    # set would dominate its budget; the record says which (docs/digits.md).
    full_epochs: int | None = None
    full_batch_size: int | None = None  # the `full` baseline's batch (None: the recipe's)

    def recipe_for(self, student: str, full: bool = False) -> TrainRecipe:
        """The protocol for one student: the shared recipe with that student's overrides."""
        changes = {"model": student}
        override = self.students.get(student)
        full_changes = {"epochs": self.full_epochs, "batch_size": self.full_batch_size}
        if override is not None:
            for f in dataclasses.fields(override):
                value = getattr(override, f.name)
                if value is None:
                    continue
                if f.name.startswith("full_"):
                    full_changes[f.name.removeprefix("full_")] = value
                else:
                    changes[f.name] = value
        if full:
            changes.update({k: v for k, v in full_changes.items() if v is not None})
        return dataclasses.replace(self.recipe, **changes)


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    description: str = ""
    image_size: int | None = None       # None: the dataset's default working size
    ipcs: tuple[int, ...] = (10,)
    holdout_fraction: float | None = None
    holdout_per_class: int | None = None
    split_seed: int = 0
    probe_per_class: int = 10           # held-out images per class for the class-order guard
    # fp32 | bf16: autocast of every forward pass (teacher training, recover, relabel, post-train,
    # evaluation). fp32 is what the papers' numbers came from; `--precision` overrides it.
    precision: str = "fp32"
    teacher: TrainRecipe = field(default_factory=TrainRecipe)
    recover: dict[str, RecoverConfig] = field(default_factory=dict)
    posttrain: PostTrain = field(default_factory=PostTrain)
    path: str = ""

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if (self.holdout_fraction is None) == (self.holdout_per_class is None):
            raise ValueError("set exactly one of holdout_fraction / holdout_per_class")


@dataclass(frozen=True)
class Method:
    """A way to produce a distilled set: `recover` (SRe2L/CDA: the task's [recover.<name>]
    settings with this crop schedule), `select` (real images: random, herding, full) or `noise`
    (the recover start point, N(0, 1) in the normalised space, never optimised: the floor every
    distilled set must clear by a wide margin)."""

    name: str
    kind: str                          # recover | select | noise
    description: str = ""
    strategy: str = ""                 # select: random | herding | full
    crop: CropSchedule | None = None   # recover: the default crop schedule (a task may override)
    path: str = ""

    def __post_init__(self):
        if self.kind not in ("recover", "select", "noise"):
            raise ValueError(f"method kind must be recover, select or noise, got {self.kind!r}")
        if self.kind == "select" and self.strategy not in ("random", "herding", "full"):
            raise ValueError(f"select strategy must be random, herding or full, got {self.strategy!r}")
        if self.kind == "recover" and self.crop is None:
            raise ValueError("a recover method needs a [crop] table")


_NESTED = {
    (TrainRecipe, "augment"): AugmentSpec,
    (StudentOverride, "augment"): AugmentSpec,
    (RecoverConfig, "crop"): CropSchedule,
    (Task, "teacher"): TrainRecipe,
    (Task, "recover"): dict,
    (Task, "posttrain"): PostTrain,
    (PostTrain, "recipe"): TrainRecipe,
    (PostTrain, "kd"): KDConfig,
    (PostTrain, "students"): dict,
    (Method, "crop"): CropSchedule,
}
_DICT_VALUE = {(Task, "recover"): RecoverConfig, (PostTrain, "students"): StudentOverride}

# CDA is the product's own method, so it is declared here; the baselines are data (baselines/).
CDA = Method(name="cda", kind="recover", crop=CropSchedule(kind="cosine", milestone=1.0),
             description="Curriculum Data Augmentation: SRe2L recover with an easy-to-hard crop-scale curriculum")


def method_uses_seed(method: Method) -> bool:
    """Whether the distilled set changes with the seed (herding and full are deterministic, so
    one set serves every seed; the seed then only seeds the student)."""
    return not (method.kind == "select" and method.strategy in ("herding", "full"))


def read_toml(path: Path | Traversable) -> dict:
    """A TOML file as a dict; a syntax error names the file."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


_NOUNS = {"tasks": "task", "baselines": "method", "suites": "suite"}


def locate(kind: str, name_or_path: str) -> Path | Traversable:
    """A packaged file by name (cdabench/builtin/<kind>/<name>.toml) or a user's own file by the
    path of a .toml file; an unknown name lists the known ones."""
    noun = _NOUNS[kind]
    if str(name_or_path).endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"no {noun} file at {path}: pass a {noun} name or the path of an existing .toml file")
        return path
    path = packaged.builtin(kind, f"{name_or_path}.toml")
    if not path.is_file():
        known = ["cda", *packaged.names(kind)] if kind == "baselines" else packaged.names(kind)
        raise ConfigError(f"unknown {noun} {name_or_path!r}: known {noun}s are {', '.join(sorted(known))} "
                          f"(or pass the path of a {noun} .toml file)")
    return path


def load_named(kind: str, cls, name_or_path: str):
    """Build dataclass `cls` from a packaged or user TOML file; `name` defaults to the file's stem
    and `path` records where it came from."""
    path = locate(kind, name_or_path)
    data = read_toml(path)
    data.setdefault("name", path.name.removesuffix(".toml"))
    return dataclasses.replace(build(cls, data, str(path)), path=str(path))


def list_tasks() -> list[str]:
    return packaged.names("tasks")


def load_task(name_or_path: str) -> Task:
    """A task by name (cdabench/builtin/tasks/<name>.toml) or by the path of a TOML file."""
    return load_named("tasks", Task, name_or_path)


def with_holdout(task: Task, per_class: int | None = None, fraction: float | None = None) -> Task:
    """The task with its held-out split size set from the command line (--holdout-per-class N or
    --holdout-fraction F); neither: the task as it is. Every key that depends on the split reads
    these fields (split_settings), so a changed size trains, distils and evaluates afresh."""
    if per_class is not None and fraction is not None:
        raise ConfigError("give one of --holdout-per-class and --holdout-fraction, not both")
    if per_class is not None and (isinstance(per_class, bool) or int(per_class) != per_class or per_class < 1):
        raise ConfigError(f"--holdout-per-class must be a positive whole number, got {per_class!r}")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ConfigError(f"--holdout-fraction must be strictly between 0 and 1, got {fraction!r}")
    if per_class is None and fraction is None:
        return task
    return dataclasses.replace(task, holdout_per_class=per_class, holdout_fraction=fraction)


def split_settings(task: Task) -> dict:
    """What the fit / held-out split depends on besides the data (part of every cache key that
    depends on the split)."""
    return {"holdout_fraction": task.holdout_fraction, "holdout_per_class": task.holdout_per_class,
            "split_seed": task.split_seed}


def list_methods() -> list[str]:
    return sorted({"cda", *packaged.names("baselines")})


def load_method(name_or_path: str) -> Method:
    """`cda`, a baseline by name (cdabench/builtin/baselines/<name>.toml) or by the path of a TOML file."""
    if name_or_path == "cda":
        return CDA
    return load_named("baselines", Method, name_or_path)


def recover_config(task: Task, method: Method) -> RecoverConfig:
    """The task's [recover.<method>] settings; the method's crop schedule unless the task sets one.
    `noise` is recover with zero iterations: the saved images are the initial noise."""
    if method.kind == "noise":
        batch = min((c.batch_size for c in task.recover.values()), default=100)
        return RecoverConfig(iterations=0, jitter=0, batch_size=batch, crop=CropSchedule(kind="none"))
    if method.name not in task.recover:
        raise ConfigError(f"task {task.name} has no [recover.{method.name}] settings; "
                          f"it declares: {', '.join(sorted(task.recover)) or 'none'}")
    config = task.recover[method.name]
    if config.crop is None:
        config = dataclasses.replace(config, crop=method.crop)
    if config.precision is None:
        config = dataclasses.replace(config, precision=task.precision)
    return config
