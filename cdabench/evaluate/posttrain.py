"""The evaluate stage: relabel -> post-train -> one record, returned (the CLI and the harness
append it to records.jsonl). A fresh student trains on the distilled set only; its last epoch
is measured on the real test split. Label stores are written atomically and reused.

The record carries the cell's curve (per epoch: mean training loss, learning rate, and the
held-out top-1 at the epochs `Watch.curve_points` picks, the last always); the caller stores it
beside the records (records.write_curve). With loggers asked for, the cell is one logger run."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from cdabench import artifacts
from cdabench.config import ConfigError
from cdabench.distill.sets import ExternalSet, load_distilled, load_external
from cdabench.distill.spaces import ZCANormalizer
from cdabench.distill.squeeze import Teacher, get_teacher, label_agreement_guard
from cdabench.engine.augment import AugmentSpec
from cdabench.engine.context import Context
from cdabench.engine.labels import (GivenLogits, HardLabels, LabelStoreConfig, OnlineKD, StoredLabels,
                                    build_label_store)
from cdabench.engine.models import check_model_name
from cdabench.engine.runtime import prepare_model
from cdabench.engine.train import ImageBank, evaluate_model, train_model
from cdabench.engine.watch import DEFAULT_CURVE_POINTS, Watch, curve_epochs, open_run
from cdabench.evaluate.record import measurement
from cdabench.schema import AugmentSpec, Method

LABEL_PROTOCOLS = ("soft", "hard", "method")   # our relabel, class labels, the method's own labels

# The student's augmentation turned off (the augmentation share's cells, docs/suites.md): every
# image is seen as stored, every epoch.
NO_AUGMENT = AugmentSpec(crop="none", flip=False, mix="none")


def _label_source(ctx: Context, recipe, labels: str, teacher: Teacher | None, bank, manifest: dict):
    kd = ctx.task.posttrain.kd
    if labels == "hard":
        return HardLabels(recipe.augment, ctx.image_size), {}
    if kd.mode == "online":
        return OnlineKD(recipe.augment, ctx.image_size, teacher.model, ctx.normalizer(), kd.temperature,
                        kd.t_squared, precision=ctx.precision), {}
    if not isinstance(bank, ImageBank):
        raise ConfigError("stored soft labels need the distilled set in memory; use kd mode = 'online' for full data")
    store_config = LabelStoreConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, augment=recipe.augment,
                                    topk=kd.topk, seed=manifest.get("seed") or 0)
    # Keyed without the epochs: a store of E epochs is the first E of a longer one (engine/labels.py),
    # so the students of one set that train for different numbers of epochs share one store.
    views = {k: v for k, v in store_config.to_dict().items() if k != "epochs"}
    key = artifacts.hash_config({"images": manifest["images_hash"], "teacher": teacher.hash,
                                 "store": views, "precision": ctx.precision})
    root = ctx.cache / "labels" / key
    store = build_label_store(root, teacher.model, bank.images, store_config, ctx.normalizer(), ctx.device,
                              ctx.image_size, precision=ctx.precision, group=ctx.group)
    source = StoredLabels(root, recipe.augment, ctx.image_size, kd.temperature, kd.t_squared, ctx.num_classes,
                          epochs=recipe.epochs)
    return source, store


def _method_label_source(ext: ExternalSet, recipe, ctx: Context):
    """A `method`-label cell's targets: the set's class indices, its logits, or its FKD labels."""
    source = ext.manifest["source"]
    if ext.label_source == "hard":
        return HardLabels(recipe.augment, ctx.image_size), {}
    if ext.label_source == "logits":
        return GivenLogits(recipe.augment, ctx.image_size, ext.logits, source["temperature"], source["t_squared"]), {}
    config = ext.fkd_manifest["config"]
    # The crops, flips and mixing are the method's, replayed from its store; the recipe's are not used.
    spec = AugmentSpec(crop="rrc", flip=True, mix=config["mix"])
    return StoredLabels(ext.fkd_store, spec, ctx.image_size, source["temperature"], source["t_squared"],
                        ctx.num_classes), ext.fkd_manifest


def method_lr(source: dict | None, labels: str) -> float | None:
    """The learned learning rate a `method`-label cell trains at (the set's, when it ships one and
    its entry keeps learned_lr on); None: the recipe's."""
    if labels != "method" or not source or not source.get("learned_lr"):
        return None
    return source.get("learned_lr_value")


def student_recipe(ctx: Context, student: str, epochs: int | None = None, full: bool = False,
                   images: int | None = None, lr: float | None = None, augment: bool = True):
    """The task's recipe for `student` on a set of `images` (which sets the epochs under the task's
    equal_steps_ipc); `epochs` (the command line's --epochs) and `lr` (a method's learned learning
    rate) override the result; `augment=False` turns the student's augmentation off (NO_AUGMENT)."""
    recipe = ctx.task.posttrain.recipe_for(student, full, images, ctx.num_classes)
    if not augment:
        recipe = dataclasses.replace(recipe, augment=NO_AUGMENT)
    recipe = dataclasses.replace(recipe, epochs=epochs) if epochs is not None else recipe
    return dataclasses.replace(recipe, lr=lr) if lr is not None else recipe


def evaluation_config(ctx: Context, student: str, labels: str, epochs: int | None = None, full: bool = False,
                      images: int | None = None, source: dict | None = None, augment: bool = True) -> dict:
    """Everything about post-train that a result depends on (hashed into every record); `source`:
    an external set's provenance (its format, space, labels and files)."""
    kd = ctx.task.posttrain.kd
    recipe = student_recipe(ctx, student, epochs, full, images, method_lr(source, labels), augment)
    config = {"recipe": dataclasses.asdict(recipe), "labels": labels,
              "kd": dataclasses.asdict(kd) if labels == "soft" else None, "precision": ctx.precision}
    if source is not None:
        config["source"] = source
    return config


def cell_name(method: str, ipc: int | None, student: str, labels: str, seed: int, augment: bool = True) -> str:
    """A post-train cell's readable name (the suite's cell, the logger run, the curve)."""
    ipc_name = "full" if ipc is None else f"ipc{ipc}"
    return f"{method}/{ipc_name}/{student}/{labels}{'' if augment else '/noaug'}/seed{seed}"


def evaluate(ctx: Context, data_dir: str | Path | None, student: str, labels: str, seed: int,
             teacher_path: str | None = None, command: str = "", epochs: int | None = None,
             teacher: Teacher | None = None,
             allow_label_mismatch: bool = False, method: Method | None = None, augment: bool = True,
             watch: Watch | None = None) -> dict:
    """Train a fresh `student` on the distilled set only; return its record (the last epoch's test
    accuracy and everything the result depends on), on every rank; the caller appends it
    (records.append_record) where it keeps its records, after storing its `curve`
    (records.write_curve).
    `teacher`: one already loaded and guarded (see `distill`). A folder without our manifest, and
    every external set, must pass the label-agreement guard (squeeze.label_agreement_guard) unless
    `allow_label_mismatch`. `method`: an external method (its [source] table says where the set is
    and how to read it; `data_dir` is then unused). `labels`: soft (our relabel), hard, or method
    (an external set's own labels: class indices, logits or FKD directory, and its learned lr).
    `augment=False`: the student trains without its augmentation (recorded). `watch`: the curve's
    held-out points and the loggers (engine/watch.py); it changes nothing in the result."""
    if labels not in LABEL_PROTOCOLS:
        raise ConfigError(f"--labels must be one of {', '.join(LABEL_PROTOCOLS)}, got {labels!r}")
    check_model_name(student)  # before any teacher or label work: a typo must not cost a relabel
    ext = load_external(ctx, method) if method is not None else None
    bank, manifest = (ext.bank, ext.manifest) if ext is not None else load_distilled(ctx, data_dir)
    if labels == "method" and ext is None:
        raise ConfigError("--labels method uses an external set's own labels: pass the set with --format/--space, "
                          "or a method entry (.toml), not one of our distilled folders (use soft or hard)")
    full = bool(manifest.get("full"))
    source = manifest.get("source")
    recipe = student_recipe(ctx, student, epochs, full, len(bank), method_lr(source, labels), augment)
    external = manifest.get("method") == "external" or ext is not None
    if teacher is None and (labels == "soft" or (external and not allow_label_mismatch)):
        teacher = get_teacher(ctx, teacher_path)
    agreement = None
    if teacher is not None and not full:
        agreement = label_agreement_guard(ctx, teacher, bank, str(source["path"] if source else data_dir),
                                          enforce=external and not allow_label_mismatch)
    if labels != "soft":
        teacher = None  # the guard's teacher only: hard and method labels use none
    relabel_start = time.perf_counter()
    if labels == "method":
        label_source, store = _method_label_source(ext, recipe, ctx)
    else:
        label_source, store = _label_source(ctx, recipe, labels, teacher, bank, manifest)
    relabel_seconds = time.perf_counter() - relabel_start
    # A ZCA set's student sees whitened inputs, and so do the real images it is tested on (as MTT/DATM evaluate).
    normalizer = ZCANormalizer(ext.zca, ctx.device) if ext is not None and ext.zca is not None else ctx.normalizer()
    eval_config = evaluation_config(ctx, student, labels, epochs, full, len(bank), source, augment)
    name = f"{ctx.task.name}/{cell_name(manifest.get('method'), manifest.get('ipc'), student, labels, seed, augment)}"
    run = open_run(watch, name, {"task": ctx.task.name, "method": manifest.get("method"), "ipc": manifest.get("ipc"),
                                 "student": student, "labels": labels, "seed": seed, "augmentation": _on(augment),
                                 "images_hash": manifest.get("images_hash"), "distilled_seed": manifest.get("seed"),
                                 **eval_config}) if ctx.group.is_main else None
    torch.manual_seed(seed)
    model = prepare_model(ctx.new_model(recipe), ctx.device)
    try:
        on_epoch = _curve_hook(ctx, recipe.epochs, watch, run, normalizer)
        result = train_model(model, bank, label_source, recipe, normalizer, ctx.device, seed, ctx.image_size,
                             description=f"post-train {student} ({manifest.get('method')}, {labels})", on_epoch=on_epoch,
                             precision=ctx.precision, group=ctx.group)
        if not ctx.group.is_main:  # data-parallel post-train: rank 0 evaluates and builds the one record
            return ctx.group.broadcast(None)
        test = evaluate_model(model, ctx.source("test"), normalizer, ctx.device, precision=ctx.precision)
        heldout = evaluate_model(model, ctx.source("heldout"), normalizer, ctx.device, precision=ctx.precision)
    except BaseException:
        if run is not None:
            run.finish(0)
        raise
    result.history[-1]["heldout_top1"] = heldout["top1"]   # the curve's last point is the record's
    if run is not None:
        last = result.history[-1]
        run.finish(recipe.epochs, {"train/loss": last["loss"], "train/lr": last["lr"], "heldout/top1": heldout["top1"],
                                   "test/top1": test["top1"], "test/top5": test["top5"]})
    kd = ctx.task.posttrain.kd
    seconds = dict(manifest.get("seconds", {}))
    seconds.update({"relabel": relabel_seconds, "posttrain": result.seconds})
    if teacher is not None:  # soft labels cost the teacher too (trained once, cached; this is its training time)
        seconds["squeeze"] = teacher.info.get("seconds", 0.0)
    hashes = {"images": manifest.get("images_hash"), "labels": store.get("label_hash"),
              "teacher": teacher.hash if teacher else None, "eval_config": artifacts.hash_config(eval_config)}
    protocol = {"soft": f"{kd.mode}-kd", "hard": "hard"}.get(labels) or f"method-{ext.label_source}"
    record = measurement(
        ctx, "cross-arch", hashes, command, method=manifest.get("method"), ipc=manifest.get("ipc"), student=student,
        labels=labels, label_protocol=protocol, seed=seed,
        top1=test["top1"], top5=test["top5"], heldout_top1=heldout["top1"], metric="last-epoch",
        label_agreement=agreement, epochs=recipe.epochs, num_images=len(bank), image_bytes=manifest.get("image_bytes"),
        label_bytes=store.get("label_bytes", 0),
        teacher_forwards=result.teacher_forwards + store.get("teacher_forwards", 0), seconds=seconds,
        precision=ctx.precision, recover_precision=manifest.get("precision"),
        recover_compiled=manifest.get("compiled"), distilled_seed=manifest.get("seed"),
        recipe=eval_config["recipe"], kd=eval_config["kd"], adaptation=ctx.adaptation(recipe),
        augmentation=_on(augment), final_loss=result.history[-1]["loss"],
        curve={"kind": "cdabench-curve", "format_version": 1, "name": name, "epochs": result.history})
    if source is not None:
        record["source"] = source
    return ctx.group.broadcast(record)


def _on(augment: bool) -> str:
    return "on" if augment else "off"


def _curve_hook(ctx: Context, epochs: int, watch: Watch | None, run, normalizer):
    """train_model's on_epoch: the held-out top-1 at the curve's epochs (rank 0; the last epoch's
    is measured once training ends, as the record's), and every epoch to the loggers."""
    points = curve_epochs(epochs, watch.curve_points if watch is not None else DEFAULT_CURVE_POINTS)

    def on_epoch(entry: dict, model) -> dict:
        metrics = {}
        if ctx.group.is_main and entry["epoch"] in points and entry["epoch"] < epochs:
            metrics["heldout_top1"] = evaluate_model(model, ctx.source("heldout"), normalizer, ctx.device,
                                                     precision=ctx.precision)["top1"]
        if run is not None and entry["epoch"] < epochs:   # the last epoch's scalars go out with the test's
            run.log(entry["epoch"], {"train/loss": entry["loss"], "train/lr": entry["lr"],
                                     **({"heldout/top1": metrics["heldout_top1"]} if metrics else {})})
        return metrics
    return on_epoch
