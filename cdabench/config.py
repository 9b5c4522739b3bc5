"""Task, method and suite configuration loaded from TOML and validated once, at the edge (the
dataclasses themselves are the leaf schema, cdabench/schema.py).

A task (cdabench/builtin/tasks/<name>.toml, or any task file passed by path) is a dataset + splits,
a teacher recipe, the recover settings per method, the IPC values and the post-train protocol. A
method is `cda` (built in) or a baseline (cdabench/builtin/baselines/<name>.toml, or a path).
Unknown keys are errors that list the known ones.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from cdabench import packaged
from cdabench.schema import (AugmentSpec, ContinualSuite, CropSchedule, ExternalSource, KDConfig, Method, PostTrain,
                             RecoverConfig, SequentialSettings, StudentOverride, Task, TrainRecipe)

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
    (Method, "source"): ExternalSource,
    (ContinualSuite, "sequential"): SequentialSettings,
}
_DICT_VALUE = {(Task, "recover"): RecoverConfig, (PostTrain, "students"): StudentOverride}

# CDA is the product's own method, so it is declared here; the baselines are data (cdabench/builtin/baselines/).
CDA = Method(name="cda", kind="recover", crop=CropSchedule(kind="cosine", milestone=1.0),
             description="Curriculum Data Augmentation: SRe2L recover with an easy-to-hard crop-scale curriculum")


def method_uses_seed(method: Method) -> bool:
    """Whether the distilled set changes with the seed (herding and full are deterministic, and an
    external set is a given file, so one set serves every seed; the seed then only seeds the student)."""
    return not (method.kind == "select" and method.strategy in ("herding", "full")) and method.kind != "external"


def external_source_path(method: Method, relative: str) -> Path:
    """A path of an external method's [source] table: absolute as written, else relative to the
    folder of the method entry that names it."""
    path = Path(relative).expanduser()
    return path if path.is_absolute() else Path(method.path).parent / path


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


@functools.cache
def packaged_methods() -> dict[str, str]:
    """Every method that ships, {name: where it is declared}: `cda` and the packaged baselines
    (a file's `name`, else its stem). Two with one name are refused: their records would mix."""
    found = {CDA.name: "cdabench/config.py (CDA)"}
    for stem in packaged.names("baselines"):
        path = packaged.builtin("baselines", f"{stem}.toml")
        where = str(path)
        name = read_toml(path).get("name", stem)
        if name in found:
            raise ConfigError(f"two methods are named {name!r}: {found[name]} and {where}; rename one")
        found[name] = where
    return found


def list_methods() -> list[str]:
    return sorted(packaged_methods())


def load_method(name_or_path: str) -> Method:
    """`cda`, a baseline by name (cdabench/builtin/baselines/<name>.toml) or by the path of a TOML
    file; a file whose method takes a packaged method's name is refused (records name a method)."""
    shipped = packaged_methods()
    if name_or_path == CDA.name:
        return CDA
    method = load_named("baselines", Method, name_or_path)
    if method.name in shipped and Path(method.path).resolve() != Path(shipped[method.name]).resolve():
        raise ConfigError(f"{name_or_path} declares method {method.name!r}, the name of the packaged method "
                          f"in {shipped[method.name]}: give it another file name (or `name = ...`) so that "
                          "their records stay apart")
    return method


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
