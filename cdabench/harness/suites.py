"""Suite kinds: one registry entry per kind (its schema and its functions), one `load_suite`.
A suite's TOML names its kind (`kind = "continual"`; default `cross-arch`); add a kind by
writing its module (validate, narrow, expand, plan, summary) and registering one more entry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cdabench import packaged
from cdabench.config import ConfigError, load_named, locate, read_toml
from cdabench.harness import continual, crossarch
from cdabench.schema import ContinualSuite, Suite


@dataclass(frozen=True)
class SuiteKind:
    name: str
    schema: type              # the suite's dataclass (cdabench/schema.py)
    validate: Callable        # validate(suite): names and numbers, before any work
    narrow: Callable          # narrow(suite, task, ipcs, students, seeds, methods, steps, strategies)
    expand: Callable          # expand(suite) -> cells, in run order
    plan: Callable            # plan(ctx, session, suite, out, command) -> [Job]: the shared stages, then a job per cell
    summary: Callable         # summary(record) -> the progress line of a finished cell
    plain_process: bool = False   # under torchrun its cells run in a process outside the group


_KINDS: dict[str, SuiteKind] = {}


def register_kind(kind: SuiteKind) -> SuiteKind:
    if kind.name in _KINDS:
        raise ValueError(f"suite kind {kind.name!r} is already registered: pick another name")
    _KINDS[kind.name] = kind
    return kind


register_kind(SuiteKind(crossarch.NAME, Suite, crossarch.validate, crossarch.narrow, crossarch.expand,
                        crossarch.plan, crossarch.summary))
# Avalanche turns its own distributed mode on (DistributedSampler, refusing loggers off rank 0)
# whenever a process group exists: under torchrun each rank runs its continual cells apart.
register_kind(SuiteKind(continual.NAME, ContinualSuite, continual.validate, continual.narrow, continual.expand,
                        continual.plan, continual.summary, plain_process=True))


def list_suites() -> list[str]:
    return packaged.names("suites")


def suite_kind(suite) -> SuiteKind:
    return _KINDS[suite.kind]


def load_suite(name_or_path: str):
    """A packaged suite by name, or a user's suite file by path, as its kind's dataclass."""
    kind = read_toml(locate("suites", name_or_path)).get("kind", crossarch.NAME)
    if kind not in _KINDS:
        raise ConfigError(f"suite {name_or_path}: unknown kind {kind!r}: use {', '.join(_KINDS)}")
    return load_named("suites", _KINDS[kind].schema, name_or_path)
