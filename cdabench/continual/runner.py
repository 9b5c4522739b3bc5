"""The `continual` suite: `cdabench run --suite continual`.

A suite TOML with `kind = "continual"` (cdabench/builtin/suites/continual.toml) declares the task, the step counts,
the protocols (`retrain`, `sequential`), the strategies, the memory sources, the memory size (images
per class) and the seeds. Every memory is distilled once (pipeline.distill into
<out>/distilled/..., the same folders `cdabench run` uses for the cross-arch suite), every cell
appends one record (records.py schema plus the continual fields), and a re-run skips every cell
whose `cell_key` (everything its result depends on) is already recorded.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from cdabench import artifacts, progress, records
from cdabench.config import (ConfigError, load_method, load_named, load_task, locate, read_toml, split_settings,
                             with_holdout)
from cdabench.continual import metrics
from cdabench.continual.memory import LABEL_BYTES_PER_IMAGE, check_memory_name, load_memory
from cdabench.continual.retrain import run_retrain
from cdabench.continual.scenario import class_order, scenario_for, split_steps
from cdabench.continual.sequential import run_sequential
from cdabench.continual.strategies import check_strategy, list_strategies, memory_kind, strategy_entry
from cdabench.distill.context import check_ipc, open_context
from cdabench.distill.pipeline import distill, student_recipe
from cdabench.distill.squeeze import get_teacher, teacher_key
from cdabench.models import MODELS
from cdabench.runtime import ProcessGroup, device_description, strip_launcher_env, versions
from cdabench.schema import CONTINUAL_PROTOCOLS, ContinualSuite
from cdabench.suite import distill_key, distill_seed, rank_record_files, rank_records_path

PROTOCOLS = CONTINUAL_PROTOCOLS
KIND = "continual"


@dataclass(frozen=True)
class ContinualCell:
    task: str
    protocol: str
    strategy: str
    memory: str          # a memory source, "own-buffer" or "none"
    ipc: int
    steps: int
    seed: int
    masked: bool | None  # retrain: the teacher's unseen-class logits masked; sequential: None (no teacher)
    student: str

    @property
    def name(self) -> str:
        masked = "" if self.masked is None else ("/masked" if self.masked else "/unmasked")
        return f"{self.protocol}/{self.strategy}/{self.memory}{masked}/ipc{self.ipc}/{self.steps}steps/seed{self.seed}"


def is_continual_suite(name: str) -> bool:
    """A suite is continual when its TOML says `kind = "continual"` (or it is named continual)."""
    try:
        path = locate("suites", name)
    except ConfigError:
        return False
    return read_toml(path).get("kind") == KIND or path.name == f"{KIND}.toml"


def load_continual_suite(name: str) -> ContinualSuite:
    return load_named("suites", ContinualSuite, name)


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
    if suite.kind != KIND:
        raise ConfigError(f"{suite.path or suite.name}: kind must be {KIND!r}, got {suite.kind!r}")
    class_order(2, 0, suite.class_order)   # an unknown convention fails here, naming the known ones
    load_task(suite.task)
    bad = [p for p in suite.protocols if p not in PROTOCOLS]
    if bad or not suite.protocols:
        raise ConfigError(f"unknown protocol(s) {', '.join(bad) or '(none given)'}: use {', '.join(PROTOCOLS)}")
    if "sequential" in suite.protocols:
        if not suite.strategies:
            raise ConfigError(f"the sequential protocol needs strategies: {', '.join(list_strategies())}")
        for strategy in suite.strategies:
            check_strategy(strategy)
    for memory in suite.memories + retrain_memories(suite):
        check_memory_name(memory)
    if "retrain" in suite.protocols and not retrain_memories(suite):
        raise ConfigError("the retrain protocol needs at least one memory source (random, herding, cda, sre2l)")
    fed = [s for s in suite.strategies if memory_kind(s) == "source"] if "sequential" in suite.protocols else []
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
                for strategy in suite.strategies:
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
    sequential = suite.strategies if "sequential" in suite.protocols else ()
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


def run_continual(suite: ContinualSuite, out: Path, data_root: str | None = None, device: str = "auto",
                  cache: str | None = None, command: str = "", precision: str | None = None,
                  holdout: tuple[int | None, float | None] = (None, None)) -> list[dict]:
    """Run every unfinished cell; returns the suite's records (old and new). `holdout`: the
    command line's (--holdout-per-class, --holdout-fraction). Under torchrun the teacher and the
    memories are made collectively (cdabench/suite.py's scheme), then the cells are dealt across
    the ranks, each rank writing its own records file merged by rank 0."""
    validate(suite)
    task = with_holdout(load_task(suite.task), *holdout)
    ipc = suite_ipc(suite, task)
    ctx = open_context(task, data_root, device, cache, precision)
    check_data(ctx, suite, ipc)
    cells = expand(suite)
    out = Path(out)
    records_path = out / "records.jsonl"
    if ctx.group.is_main:  # records of a killed multi-process run that rank 0 had not merged yet
        records.merge_records(records_path, rank_record_files(out))
    ctx.group.barrier()
    existing = records.read_records(records_path) if records_path.exists() else []
    done = {r.get("cell_key"): r for r in existing}
    dataset = ctx.data.fingerprint()
    start = time.perf_counter()
    state: dict = {"teacher": None, "scenarios": {}, "memories": {}, "folders": {}}

    def teacher():
        if state["teacher"] is None:
            state["teacher"] = get_teacher(ctx)
        return state["teacher"]

    def memory(name: str, seed: int):
        dseed = distill_seed(name, seed)
        if (name, dseed) not in state["memories"]:
            config_hash = distill_key(ctx, name, teacher_key(ctx, 0))[:10]
            folder = out / "distilled" / f"{name}-ipc{ipc}-seed{dseed}-{config_hash}"
            distill(ctx, name, ipc, dseed, folder, command=command, teacher=teacher())
            state["memories"][(name, dseed)] = load_memory(ctx, folder, ipc)
            state["folders"][(name, dseed)] = folder
        return state["memories"][(name, dseed)]

    def scenario(steps: int, seed: int):
        if (steps, seed) not in state["scenarios"]:
            state["scenarios"][(steps, seed)] = scenario_for(ctx, steps, seed, suite.class_order)
        return state["scenarios"][(steps, seed)]

    # The plan: every rank computes the same keys, distilling the memories collectively (their
    # recover shards are dealt across torchrun's ranks) in the same order.
    plan = []
    for cell in cells:
        sc = scenario(cell.steps, cell.seed)
        mem = memory(cell.memory, cell.seed) if cell.memory not in ("own-buffer", "none") else None
        mem_size = ipc * ctx.num_classes if cell.memory == "own-buffer" else 0
        eval_config = _eval_config(ctx, suite, cell, mem_size)
        teacher_hash = teacher().hash if cell.protocol == "retrain" else None
        composition = {k: v for k, v in sc.composition().items() if k != "step_class_names"}
        key = cell_key(cell, dataset, composition, mem.images_hash if mem else None, eval_config, teacher_hash,
                       split_settings(task))
        plan.append((cell, sc, mem, mem_size, eval_config, key))
    todo, queued = [], set()
    for entry in plan:
        if entry[-1] not in done and entry[-1] not in queued:
            queued.add(entry[-1])
            todo.append(entry)
    group = ctx.group
    solo = dataclasses.replace(ctx, group=ProcessGroup())  # cells run in this process alone
    mine = todo[group.rank::group.world]  # under torchrun: dealt round-robin in grid order
    mine_path = records_path if group.world == 1 else rank_records_path(out, group.rank)
    if group.world > 1:
        # Avalanche turns its own distributed mode on (DistributedSampler, refusing loggers off
        # rank 0) whenever a process group exists: each rank runs its cells in a plain process.
        def folder(cell):
            if cell.memory in ("own-buffer", "none"):
                return None
            return state["folders"][(cell.memory, distill_seed(cell.memory, cell.seed))]
        cells_apart = _cells_apart(task, data_root, str(ctx.device), cache, ctx.precision, ipc, suite, command,
                                   [(entry, folder(entry[0])) for entry in mine])
    label = f"suite {suite.name}" + (f" (rank {group.rank})" if group.world > 1 else "")
    with progress.track(label, len(mine) if group.world > 1 else len(cells)) as bar:
        if group.world == 1:
            bar.advance(len(cells) - len(mine), "already recorded")
        for cell, sc, mem, mem_size, eval_config, key in mine:
            if group.world > 1:
                record = next(cells_apart)
            else:
                record = run_cell(solo, suite, cell, sc, mem, mem_size,
                                  teacher() if cell.protocol == "retrain" else None, eval_config, command)
            record.update({"suite": suite.name, "cell": cell.name, "cell_key": key})
            done[key] = records.append_record(mine_path, record)
            progress.log(f"{cell.name}: final top-1 {record['final_accuracy']:.2f}%, forgetting "
                         f"{record['forgetting']:.2f}, BWT {record['bwt']:+.2f}")
            bar.advance(1, cell.name)
    if group.world > 1:
        group.barrier()
        if group.is_main:
            records.merge_records(records_path, rank_record_files(out), order=[p[-1] for p in plan])
        group.barrier()
        done = {r.get("cell_key"): r for r in records.read_records(records_path)}
    progress.log(f"suite {suite.name}: {len(cells)} cells in {time.perf_counter() - start:.0f}s -> {records_path}")
    return [done[p[-1]] for p in plan]


_WORKER: dict = {}


def _init_cell_worker(task, data_root, device: str, cache, precision: str, threads: int) -> None:
    strip_launcher_env()  # a plain process: no process group, so Avalanche stays single-process
    torch.set_num_threads(threads)
    progress.set_quiet(True)
    _WORKER.update(ctx=open_context(task, data_root, device, cache, precision), teacher=None)


def _cell_in_worker(suite, cell, mem_folder, mem_size: int, eval_config: dict, command: str, ipc: int) -> dict:
    ctx = _WORKER["ctx"]
    if cell.protocol == "retrain" and _WORKER["teacher"] is None:
        _WORKER["teacher"] = get_teacher(ctx)  # the suite's, from the cache
    sc = scenario_for(ctx, cell.steps, cell.seed, suite.class_order)
    mem = load_memory(ctx, mem_folder, ipc) if mem_folder is not None else None
    return run_cell(ctx, suite, cell, sc, mem, mem_size, _WORKER["teacher"] if cell.protocol == "retrain" else None,
                    eval_config, command)


def _cells_apart(task, data_root, device: str, cache, precision: str, ipc: int, suite, command: str, jobs):
    """Yield the records of `jobs` ((plan entry, memory folder) pairs), run one after another in
    one spawned process without torchrun's environment."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_init_cell_worker,
                             initargs=(task, data_root, device, cache, precision, torch.get_num_threads())) as pool:
        for (cell, _, _, mem_size, eval_config, _), folder in jobs:
            yield pool.submit(_cell_in_worker, suite, cell, folder, mem_size, eval_config, command, ipc).result()


def run_cell(ctx, suite: ContinualSuite, cell: ContinualCell, sc, mem, mem_size: int, teacher, eval_config: dict,
             command: str = "") -> dict:
    """Run one cell and build its record (not yet written)."""
    architecture = student_recipe(ctx, suite.student)  # the task's settings for this student (its patch size)

    def make_model():
        return ctx.new_model(architecture)

    normalizer = ctx.normalizer()
    if cell.protocol == "retrain":
        recipe = student_recipe(ctx, suite.student, suite.retrain_epochs)
        outcome = run_retrain(sc, mem.bank, teacher.model, make_model, recipe, ctx.task.posttrain.kd, normalizer,
                              ctx.device, cell.seed, ctx.image_size, masked=bool(cell.masked),
                              description=f"retrain {mem.name}", precision=ctx.precision)
        epochs, labels = recipe.epochs, "soft"
        label_protocol = f"{ctx.task.posttrain.kd.mode}-kd-{'masked' if cell.masked else 'unmasked'}"
        num_images, image_bytes, label_bytes = len(mem), mem.image_bytes, 0
    else:
        outcome = run_sequential(sc, cell.strategy, make_model, suite.sequential, normalizer, ctx.device, cell.seed,
                                 ctx.cache, memory=mem.bank if mem else None, mem_size=mem_size,
                                 description=f"{cell.strategy} ({cell.memory})")
        epochs, labels, label_protocol = suite.sequential.epochs, "hard", "hard"
        if mem is not None:
            num_images, image_bytes = len(mem), mem.image_bytes
        else:
            num_images = mem_size
            image_bytes = mem_size * ctx.shape[0] * ctx.image_size * ctx.image_size   # raw uint8 pixels
        label_bytes = num_images * LABEL_BYTES_PER_IMAGE
        if strategy_entry(cell.strategy).stores_logits:   # DER: the logits of every buffered image (float32)
            label_bytes += num_images * ctx.num_classes * 4
    result = metrics.summarise(outcome.top1, outcome.top5, sc.test_counts())
    seconds = dict(mem.manifest.get("seconds", {})) if mem else {}
    seconds.update({"continual": outcome.seconds, "evaluation": outcome.eval_seconds})
    composition = sc.composition()
    return {
        "task": ctx.task.name, "dataset": ctx.data.spec.name, "method": cell.memory, "ipc": cell.ipc,
        "student": suite.student, "labels": labels, "label_protocol": label_protocol, "seed": cell.seed,
        "top1": result.final_accuracy, "top5": result.final_top5, "metric": "final seen-class accuracy",
        "epochs": epochs, "num_images": num_images, "image_bytes": image_bytes, "label_bytes": label_bytes,
        "teacher_forwards": outcome.teacher_forwards, "seconds": seconds, "device": device_description(ctx.device),
        "versions": versions(),
        # Avalanche's training loops run in fp32; the retrain protocol uses the task's precision.
        "precision": ctx.precision if cell.protocol == "retrain" else "fp32",
        "hashes": {"images": mem.images_hash if mem else None, "labels": None,
                   "teacher": teacher.hash if teacher is not None else None,
                   "eval_config": artifacts.hash_config(eval_config), "classes": artifacts.hash_config(ctx.classes),
                   "scenario": artifacts.hash_config(composition)},
        "continual": True, "protocol": cell.protocol, "strategy": cell.strategy, "memory": cell.memory,
        "masked": cell.masked, "steps": cell.steps, "order_seed": composition["order_seed"],
        "class_order": composition["class_order"], "class_order_convention": suite.class_order,
        "step_classes": composition["steps"],
        "test_images": composition["test_images"], "mem_size": num_images,
        "image_bytes_kind": "stored files" if mem is not None else ("raw uint8 pixels" if num_images else "none"),
        **result.to_record(), "step_details": outcome.steps,
        "sequential": suite.sequential.to_dict() if cell.protocol == "sequential" else None,
        "distilled_seed": mem.manifest.get("seed") if mem else None,
        "adaptation": ctx.adaptation(architecture), "command": command,
    }
