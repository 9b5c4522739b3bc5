"""The files that ship inside the package (cdabench/builtin/): tasks, baselines, suites, the
published numbers, the regression targets and example entries of external methods. They are read through importlib.resources, so every
command finds them from an installed wheel in any folder, not only beside a source checkout."""
from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

KINDS = ("tasks", "baselines", "suites", "leaderboards", "external")


def builtin(kind: str, name: str = "") -> Traversable:
    """cdabench/builtin/<kind>/<name> (the folder itself when no name is given)."""
    if kind not in KINDS:
        raise ValueError(f"no packaged folder {kind!r}: the package ships {', '.join(KINDS)}")
    folder = resources.files("cdabench").joinpath("builtin", kind)
    return folder.joinpath(name) if name else folder


def names(kind: str) -> list[str]:
    """The names of the packaged TOML files of one kind (a task, baseline or suite name each)."""
    return sorted(entry.name.removesuffix(".toml") for entry in builtin(kind).iterdir()
                  if entry.name.endswith(".toml"))
