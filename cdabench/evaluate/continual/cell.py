"""One continual cell measured: a class-incremental scenario trained under one protocol (the
papers' `retrain`, or `sequential` through an Avalanche strategy) with one memory, summarised
into its record (returned, not written: the harness writes records)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cdabench import artifacts
from cdabench.evaluate.continual import metrics
from cdabench.evaluate.continual.memory import LABEL_BYTES_PER_IMAGE
from cdabench.engine.watch import Watch, open_run
from cdabench.evaluate.continual.retrain import run_retrain
from cdabench.evaluate.continual.sequential import avalanche_loggers, close_avalanche_loggers, run_sequential
from cdabench.evaluate.continual.strategies import strategy_entry
from cdabench.evaluate.posttrain import student_recipe
from cdabench.evaluate.record import measurement
from cdabench.schema import ContinualSuite


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


def _seen_top1(row: list[float], weights: list[int], step: int) -> float:
    """The seen-class accuracy after `step` from one row of the accuracy matrix (metrics.seen_accuracy)."""
    return metrics.seen_accuracy([list(row)] * len(row), weights)[step]


def evaluate_continual(ctx, suite: ContinualSuite, cell: ContinualCell, sc, mem, mem_size: int, teacher,
                       eval_config: dict, command: str = "", watch: Watch | None = None) -> dict:
    """Run one cell; its record (not yet written). `watch.loggers`: one logger run for the cell,
    Avalanche's own loggers for a sequential cell, ours (engine/watch.py) for a retrain cell."""
    architecture = student_recipe(ctx, suite.student)  # the task's settings for this student (its patch size)

    def make_model():
        return ctx.new_model(architecture)

    normalizer = ctx.normalizer()
    weights = sc.test_counts()
    name = f"{ctx.task.name}/{cell.name}"
    config = {"task": ctx.task.name, **dataclasses.asdict(cell), **eval_config}
    if cell.protocol == "retrain":
        recipe = student_recipe(ctx, suite.student, suite.retrain_epochs)
        run = open_run(watch, name, config)

        def on_epoch(step: int, entry: dict) -> None:
            run.log(step * recipe.epochs + entry["epoch"], {"train/loss": entry["loss"], "train/lr": entry["lr"]})

        def on_step(step: int, top1: list[float]) -> None:
            run.log((step + 1) * recipe.epochs, {"test/seen_top1": _seen_top1(top1, weights, step)})
        try:
            outcome = run_retrain(sc, mem.bank, teacher.model, make_model, recipe, ctx.task.posttrain.kd, normalizer,
                                  ctx.device, cell.seed, ctx.image_size, masked=bool(cell.masked),
                                  description=f"retrain {mem.name}", precision=ctx.precision,
                                  on_epoch=on_epoch if run else None, on_step=on_step if run else None)
        finally:
            if run is not None:
                run.finish(sc.num_steps * recipe.epochs)
        epochs, labels = recipe.epochs, "soft"
        label_protocol = f"{ctx.task.posttrain.kd.mode}-kd-{'masked' if cell.masked else 'unmasked'}"
        num_images, image_bytes, label_bytes = len(mem), mem.image_bytes, 0
    else:
        loggers = avalanche_loggers(watch, name, config)

        def log_step(step: int, top1: list[float], iteration: int) -> None:
            for logger in loggers:
                logger.log_single_metric("test/seen_top1", _seen_top1(top1, weights, step), iteration)
        try:
            outcome = run_sequential(sc, cell.strategy, make_model, suite.sequential, normalizer, ctx.device,
                                     cell.seed, ctx.cache, memory=mem.bank if mem else None, mem_size=mem_size,
                                     description=f"{cell.strategy} ({cell.memory})", loggers=loggers,
                                     on_step=log_step if loggers else None)
        finally:
            close_avalanche_loggers(loggers)
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
    hashes = {"images": mem.images_hash if mem else None, "labels": None,
              "teacher": teacher.hash if teacher is not None else None,
              "eval_config": artifacts.hash_config(eval_config), "scenario": artifacts.hash_config(composition)}
    return measurement(ctx, "continual", hashes, command, **{
        "method": cell.memory, "ipc": cell.ipc,
        "student": suite.student, "labels": labels, "label_protocol": label_protocol, "seed": cell.seed,
        "top1": result.final_accuracy, "top5": result.final_top5, "metric": "final seen-class accuracy",
        "epochs": epochs, "num_images": num_images, "image_bytes": image_bytes, "label_bytes": label_bytes,
        "teacher_forwards": outcome.teacher_forwards, "seconds": seconds,
        # Avalanche's training loops run in fp32; the retrain protocol uses the task's precision.
        "precision": ctx.precision if cell.protocol == "retrain" else "fp32",
        "protocol": cell.protocol, "strategy": cell.strategy, "memory": cell.memory,
        "masked": cell.masked, "steps": cell.steps, "order_seed": composition["order_seed"],
        "class_order": composition["class_order"], "class_order_convention": suite.class_order,
        "step_classes": composition["steps"],
        "test_images": composition["test_images"], "mem_size": num_images,
        "image_bytes_kind": "stored files" if mem is not None else ("raw uint8 pixels" if num_images else "none"),
        **result.to_record(), "step_details": outcome.steps,
        "sequential": suite.sequential.to_dict() if cell.protocol == "sequential" else None,
        "distilled_seed": mem.manifest.get("seed") if mem else None,
        "adaptation": ctx.adaptation(architecture),
    })
