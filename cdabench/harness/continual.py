"""The continual suite kind (`kind = "continual"`, e.g. `cdabench run --suite continual`).

A continual suite declares the task, the step counts, the protocols (`retrain`, `sequential`),
the strategies, the memory sources, the memory size (images per class) and the seeds. Its shared
stages are the teacher and every memory, distilled once into the same <out>/distilled/ folders
the cross-arch kind uses; each cell trains one scenario under one protocol
(continual.cell.evaluate_continual). The harness (harness/run.py) runs the cells.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import timm

from cdabench import artifacts
from cdabench.config import ConfigError, load_method, load_task, split_settings
from cdabench.distill.sets import distill
from cdabench.engine.context import Context, check_ipc
from cdabench.engine.models import MODELS
from cdabench.evaluate.continual.cell import ContinualCell, evaluate_continual
from cdabench.evaluate.continual.memory import check_memory_name, load_memory
from cdabench.evaluate.continual.scenario import class_order, scenario_for, split_steps
from cdabench.evaluate.continual.strategies import check_strategy, list_strategies, memory_kind
from cdabench.evaluate.posttrain import student_recipe
from cdabench.harness.cells import Job, Session, distill_seed, set_folder
from cdabench.schema import CONTINUAL_PROTOCOLS, ContinualSuite

NAME = "continual"
PROTOCOLS = CONTINUAL_PROTOCOLS


def narrow(suite: ContinualSuite, task=None, ipcs=None, students=None, seeds=None, methods=None, steps=None,
           strategies=None) -> ContinualSuite:
    """The command line's overrides: --methods chooses the memory sources of both protocols (the
    unmasked retrain runs stay for those still listed), --ipc and --students take one value each."""
    changes: dict = {k: tuple(v) for k, v in
                     {"seeds": seeds, "memories": methods, "steps": steps, "strategies": strategies}.items() if v}
    if methods:
        changes.update(retrain_memories=None, unmasked=tuple(m for m in suite.unmasked if m in methods))
    for flag, values, key in (("--ipc", ipcs, "ipc"), ("--students", students, "student")):
        if values:
            if len(values) > 1:
                raise ConfigError(f"{flag} takes one value for a continual suite (every memory has the same size)")
            changes[key] = values[0]
    if task:
        changes["task"] = task
    return dataclasses.replace(suite, **changes)


def validate(suite: ContinualSuite) -> None:
    """Names and numbers are checked before any work starts; errors list the valid choices."""
    if suite.kind != NAME:
        raise ConfigError(f"{suite.path or suite.name}: kind must be {NAME!r}, got {suite.kind!r}")
    class_order(2, 0, suite.class_order)   # an unknown convention fails here, naming the known ones
    load_task(suite.task)
    bad = [p for p in suite.protocols if p not in PROTOCOLS]
    if bad or not suite.protocols:
        raise ConfigError(f"unknown protocol(s) {', '.join(bad) or '(none given)'}: use {', '.join(PROTOCOLS)}")
    if "sequential" in suite.protocols:
        if not strategies(suite):
            raise ConfigError(f"the sequential protocol needs strategies: {', '.join(list_strategies())}")
        for strategy in strategies(suite):
            check_strategy(strategy)
    for memory in suite.memories + retrain_memories(suite):
        check_memory_name(memory)
    if "retrain" in suite.protocols and not retrain_memories(suite):
        raise ConfigError("the retrain protocol needs at least one memory source (random, herding, cda, sre2l)")
    fed = [s for s in strategies(suite) if memory_kind(s) == "source"] if "sequential" in suite.protocols else []
    if fed and not suite.memories:
        raise ConfigError(f"strategy {fed[0]} needs at least one memory source "
                          "(memories = [random, herding, cda, sre2l])")
    missing = [m for m in suite.unmasked if m not in retrain_memories(suite)]
    if missing:
        raise ConfigError(f"unmasked lists {', '.join(missing)}, which are not among the retrain memories "
                          f"{', '.join(retrain_memories(suite))}")
    if not suite.steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in suite.steps):
        raise ConfigError(f"steps must be positive whole numbers, got {list(suite.steps)}")
    if suite.ipc is not None and (isinstance(suite.ipc, bool) or not isinstance(suite.ipc, int) or suite.ipc < 1):
        raise ConfigError(f"ipc must be a positive number of images per class, got {suite.ipc!r}")
    if suite.retrain_epochs is not None and suite.retrain_epochs < 1:
        raise ConfigError(f"retrain_epochs must be positive, got {suite.retrain_epochs}")
    if not suite.seeds:
        raise ConfigError("seeds must list at least one seed")
    if suite.student not in MODELS and not timm.is_model(suite.student):
        raise ConfigError(f"unknown student {suite.student!r}: use {', '.join(sorted(MODELS))} or a timm model name")


def strategies(suite: ContinualSuite) -> tuple[str, ...]:
    """The suite's sequential strategies; none listed: every registered one, in registration order."""
    return tuple(list_strategies()) if suite.strategies is None else suite.strategies


def retrain_memories(suite: ContinualSuite) -> tuple[str, ...]:
    return suite.memories if suite.retrain_memories is None else suite.retrain_memories


def suite_ipc(suite: ContinualSuite, task) -> int:
    return suite.ipc if suite.ipc is not None else task.ipcs[0]


def expand(suite: ContinualSuite) -> list[ContinualCell]:
    """The grid in run order: seed, steps, then retrain cells (masked, then unmasked), then
    sequential cells (replay once per memory source; the other strategies once)."""
    task = load_task(suite.task)
    ipc = suite_ipc(suite, task)
    cells = []
    for seed in suite.seeds:
        for steps in suite.steps:
            def cell(protocol, strategy, memory, masked):
                return ContinualCell(task.name, protocol, strategy, memory, ipc, steps, seed, masked, suite.student)
            if "retrain" in suite.protocols:
                cells += [cell("retrain", "retrain", m, True) for m in retrain_memories(suite)]
                cells += [cell("retrain", "retrain", m, False) for m in retrain_memories(suite) if m in suite.unmasked]
            if "sequential" in suite.protocols:
                for strategy in strategies(suite):
                    kind = memory_kind(strategy)
                    memories = suite.memories if kind == "source" else (kind,)
                    cells += [cell("sequential", strategy, m, None) for m in memories]
    return cells


def check_data(ctx, suite: ContinualSuite, ipc: int) -> None:
    """Errors that need the dataset but no training: step counts that do not divide the classes,
    a memory larger than the real data it must be drawn from."""
    for steps in suite.steps:
        split_steps(list(range(ctx.num_classes)), steps, f"{ctx.data.spec.name} ({ctx.task.name})")
    used = set(retrain_memories(suite) if "retrain" in suite.protocols else ())
    sequential = strategies(suite) if "sequential" in suite.protocols else ()
    if any(memory_kind(s) == "source" for s in sequential):
        used |= set(suite.memories)
    real = sorted(m for m in used if load_method(m).kind == "select")
    own = [s for s in sequential if memory_kind(s) == "own-buffer"]
    if real or own:
        check_ipc(ctx, ipc)


def _eval_config(ctx, suite: ContinualSuite, cell: ContinualCell, mem_size: int) -> dict:
    if cell.protocol == "retrain":
        recipe = student_recipe(ctx, suite.student, suite.retrain_epochs)
        return {"protocol": "retrain", "recipe": dataclasses.asdict(recipe),
                "kd": dataclasses.asdict(ctx.task.posttrain.kd), "masked": cell.masked, "precision": ctx.precision}
    return {"protocol": "sequential", "strategy": cell.strategy, "settings": suite.sequential.to_dict(),
            "mem_size": mem_size, "student": suite.student, "augmentation": None}


def cell_key(cell: ContinualCell, dataset: str, scenario: dict, images_hash: str | None, eval_config: dict,
             teacher_hash: str | None, split: dict) -> str:
    return artifacts.hash_config({"cell": dataclasses.asdict(cell), "dataset": dataset, "scenario": scenario,
                                  "split": split, "images": images_hash, "eval": eval_config,
                                  "teacher": teacher_hash})


def plan(ctx: Context, session: Session, suite: ContinualSuite, out: Path, command: str) -> list[Job]:
    """The shared stages (the teacher when a cell or a memory needs it; every memory), then one
    job per cell. Every rank of a torchrun launch computes the same plan, distilling the memories
    collectively (their recover shards are dealt across the ranks) in the same order."""
    ipc = suite_ipc(suite, ctx.task)
    check_data(ctx, suite, ipc)
    dataset = ctx.data.fingerprint()
    jobs = []
    for cell in expand(suite):
        sc = scenario(session, cell.steps, cell.seed, suite.class_order)
        folder = mem = None
        if cell.memory not in ("own-buffer", "none"):
            dseed = distill_seed(cell.memory, cell.seed)
            folder = str(set_folder(ctx, out, cell.memory, ipc, dseed))
            session.memo(("distilled", folder), lambda: distill(ctx, cell.memory, ipc, dseed, folder, command=command,
                                                                teacher=session.teacher(), make=session.make_stages))
            mem = memory(session, folder, ipc)
        mem_size = ipc * ctx.num_classes if cell.memory == "own-buffer" else 0
        eval_config = _eval_config(ctx, suite, cell, mem_size)
        teacher_hash = session.teacher().hash if cell.protocol == "retrain" else None
        composition = {k: v for k, v in sc.composition().items() if k != "step_class_names"}
        key = cell_key(cell, dataset, composition, mem.images_hash if mem else None, eval_config, teacher_hash,
                       split_settings(ctx.task))
        jobs.append(Job(key, cell.name, _steps(ctx, suite, cell), run_cell,
                        {"suite": suite, "cell": cell, "folder": folder, "mem_size": mem_size,
                         "eval_config": eval_config, "command": command}, student=suite.student))
    return jobs


def scenario(session: Session, steps: int, seed: int, convention: str):
    return session.memo(("scenario", steps, seed, convention),
                        lambda: scenario_for(session.ctx, steps, seed, convention))


def memory(session: Session, folder: str, ipc: int):
    return session.memo(("memory", folder), lambda: load_memory(session.ctx, Path(folder), ipc))


def _steps(ctx: Context, suite: ContinualSuite, cell: ContinualCell) -> int:
    """A cell's optimiser steps, roughly (for dealing the longest first): retrain trains a model on
    the memory at every step; sequential passes over the stream."""
    if cell.protocol == "retrain":
        recipe = student_recipe(ctx, suite.student, suite.retrain_epochs)
        return cell.steps * recipe.epochs * math.ceil(cell.ipc * ctx.num_classes / recipe.batch_size)
    return suite.sequential.epochs * math.ceil(len(ctx.fit) / suite.sequential.batch_size)


def run_cell(session: Session, suite: ContinualSuite, cell: ContinualCell, folder: str | None, mem_size: int,
             eval_config: dict, command: str) -> dict:
    """One cell, in this process or a worker: its record."""
    sc = scenario(session, cell.steps, cell.seed, suite.class_order)
    mem = memory(session, folder, cell.ipc) if folder is not None else None
    teacher = session.teacher() if cell.protocol == "retrain" else None
    return evaluate_continual(session.ctx, suite, cell, sc, mem, mem_size, teacher, eval_config, command,
                              watch=session.watch)


def summary(record: dict) -> str:
    """The progress line of a finished cell."""
    return (f"final top-1 {record['final_accuracy']:.2f}%, forgetting {record['forgetting']:.2f}, "
            f"BWT {record['bwt']:+.2f}")
