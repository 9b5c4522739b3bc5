"""The teacher a distillation uses: a checkpoint of another class count, another class map or
another architecture is refused, one that carries code is refused without running it, and the
class-order guard trips on a teacher whose head is permuted; a task's `teacher_seed` draws another
teacher and its default keeps the key the teacher had before the setting existed."""
from __future__ import annotations

import os

import pytest
import torch

from cdabench.distill.squeeze import load_teacher
from cdabench.engine.models import create_model
from tests.fixtures import run_cli, squeezed


def test_teacher_with_wrong_class_count(capsys, cli_common, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "five.pt"
    torch.save(create_model("resnet18", 5, 1, 8).state_dict(), path)
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(path),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and "has 5 classes but dataset digits has 10" in text


@pytest.mark.slow
def test_teacher_with_permuted_head_trips_class_order_guard(capsys, cli_common, tiny_ctx, tiny_teacher, tmp_path):
    state = {k: v.detach().clone() for k, v in tiny_teacher.model.state_dict().items()}
    good = tmp_path / "good.pt"
    torch.save(state, good)
    assert load_teacher(tiny_ctx, good).info["probe_top1"] >= 50.0   # the unpermuted head passes the guard
    state["fc.weight"] = torch.roll(state["fc.weight"], 1, dims=0)   # class c now answers as c+1
    state["fc.bias"] = torch.roll(state["fc.bias"], 1, dims=0)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(bad),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and "class-order guard" in text and "do not match the dataset's class order" in text
    assert not (tmp_path / "out" / "manifest.json").exists()


def _teacher_state(tiny_teacher) -> dict:
    return {k: v.detach().clone() for k, v in tiny_teacher.model.state_dict().items()}


@pytest.mark.slow
def test_teacher_trained_with_another_class_map_is_refused(capsys, cli_common, tiny_ctx, tiny_teacher, tmp_path):
    """A checkpoint in our format names its class map; another order of the same classes is refused
    before anything uses it (the class-order guard would pass: the weights are the good teacher's)."""
    state = _teacher_state(tiny_teacher)
    other = tmp_path / "other-map.pt"
    torch.save({"state_dict": state, "classes": list(reversed(tiny_ctx.classes))}, other)
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(other),
                               "--out", str(tmp_path / "out")])
    first, expected = tiny_ctx.classes[-1], tiny_ctx.classes[0]
    assert code == 2 and "was trained with another class map" in text, text
    assert f"(first difference at index 0: {first!r} vs {expected!r})" in text
    assert not (tmp_path / "out").exists()
    same = tmp_path / "same-map.pt"
    torch.save({"state_dict": state, "classes": list(tiny_ctx.classes)}, same)
    assert load_teacher(tiny_ctx, same).info["classes"] == tiny_ctx.classes     # the same map loads


@pytest.mark.parametrize("architecture", ["resnet50", "mobilenetv2"])
def test_teacher_of_another_architecture_is_refused(capsys, cli_common, architecture, tmp_path):
    """The task's teacher is a ResNet-18: a ResNet-50 (same head name, other shapes) or a
    MobileNetV2 (other names) of the right class count is refused, naming the architecture."""
    torch.manual_seed(0)
    path = tmp_path / f"{architecture}.pt"
    torch.save(create_model(architecture, 10, 1, 8).state_dict(), path)
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(path),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and squeezed(f"teacher checkpoint {path} does not fit resnet18 at 8px") in squeezed(text), text
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Pickles as a call of os.mkdir(path): unpickling it runs code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("command", ["distill", "evaluate"])
def test_a_teacher_checkpoint_carrying_code_is_refused_and_never_run(capsys, cli_common, tiny_teacher, distilled,
                                                                      command, tmp_path):
    """A torch checkpoint whose pickle calls a function on load (os.mkdir here; any code in
    general) is refused by the weights-only loader, and the call never happens."""
    ran = tmp_path / "the-checkpoint-ran-code"
    path = tmp_path / "carries-code.pt"
    torch.save({"state_dict": _teacher_state(tiny_teacher), "extra": _RunsCode(str(ran))}, path)
    if command == "distill":
        argv = ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--out", str(tmp_path / "out")]
    else:
        argv = ["evaluate", *cli_common, "--data", str(distilled("random")), "--labels", "soft", "--epochs", "1",
                "--out", str(tmp_path / "out")]
    code, text = run_cli(capsys, [*argv, "--teacher", str(path)])
    refused = f"{os.mkdir.__module__}.{os.mkdir.__name__}"                     # posix.mkdir: what it would call
    assert code == 2 and "weights-only" in text and refused in text, text
    assert not ran.exists(), "loading the teacher ran the code in its pickle"
    assert not (tmp_path / "out" / "records.jsonl").exists()
    torch.load(path, weights_only=False)          # the payload is live: a plain unpickling runs it
    assert ran.is_dir()


def test_the_smoke_task_loads_its_packaged_teacher_not_a_trained_one(tmp_path):
    """The smoke task's `teacher_checkpoint`: the packaged file (sha256 as its provenance says) is
    the teacher every machine's regression check uses, whatever the cache holds, and it is the
    teacher the provenance describes (its held-out accuracy, recomputed here)."""
    import dataclasses
    import hashlib
    import io
    import json

    from cdabench import packaged
    from cdabench.config import load_task
    from cdabench.data import DataError
    from cdabench.distill.squeeze import get_teacher
    from cdabench.engine.context import open_context
    from cdabench.engine.train import evaluate_model

    task = load_task("digits-smoke")
    provenance = json.loads(packaged.builtin("teachers", "digits-smoke-test_resnet.json").read_text())
    assert task.teacher_checkpoint == provenance["file"]
    blob = packaged.builtin("teachers", task.teacher_checkpoint).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == provenance["sha256"]

    ctx = open_context(task, None, "cpu", str(tmp_path / "cache"))
    teacher = get_teacher(ctx, train=False)           # train=False: a trained teacher would be StageMissing
    saved = torch.load(io.BytesIO(blob), weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in teacher.model.state_dict().items())
    heldout = evaluate_model(teacher.model, ctx.source("heldout"), ctx.normalizer(), ctx.device)
    # within one held-out image (0.70 points of 142): a logit near a tie may flip on another float path
    assert heldout["top1"] == pytest.approx(provenance["heldout_top1"], abs=0.71)
    assert not (tmp_path / "cache" / "teachers").exists()

    missing = dataclasses.replace(task, teacher_checkpoint="no-such-teacher.pt")
    with pytest.raises(DataError, match=r"teacher_checkpoint 'no-such-teacher.pt' is neither a file in "
                                        r"cdabench/builtin/teachers/ nor a path"):
        get_teacher(open_context(missing, None, "cpu", str(tmp_path / "cache")), train=False)


@pytest.mark.slow
def test_teacher_seed_draws_another_teacher_and_zero_keeps_the_earlier_key(tiny_task, tiny_ctx, tiny_teacher,
                                                                           session_cache):
    import dataclasses

    from cdabench import artifacts
    from cdabench.distill.squeeze import get_teacher, teacher_key
    from cdabench.engine.context import open_context
    from cdabench.engine.train import evaluate_model

    assert tiny_task.teacher_seed == 0
    # the key as it was computed before `teacher_seed` existed (seed 0 spelled out): finished runs keep it
    earlier = artifacts.hash_config({
        "stage": "squeeze", "dataset": tiny_ctx.data.fingerprint(), "task_split": [
            tiny_task.holdout_fraction, tiny_task.holdout_per_class, tiny_task.split_seed],
        "recipe": dataclasses.asdict(tiny_task.teacher), "precision": tiny_ctx.precision, "seed": 0})
    assert teacher_key(tiny_ctx) == earlier == tiny_teacher.info["key"]

    ctx = open_context(dataclasses.replace(tiny_task, teacher_seed=1), None, "cpu", session_cache)
    other = get_teacher(ctx)
    assert other.info["seed"] == 1 and other.info["key"] == teacher_key(ctx) != earlier
    assert other.hash != tiny_teacher.hash
    assert any(not torch.equal(v, tiny_teacher.model.state_dict()[k]) for k, v in other.model.state_dict().items())
    heldout = evaluate_model(other.model, ctx.source("heldout"), ctx.normalizer(), ctx.device)
    assert heldout["top1"] == pytest.approx(other.info["heldout_top1"])
    assert get_teacher(ctx, train=False).hash == other.hash   # cached under its own key, reused
    with pytest.raises(ValueError, match=r"teacher_seed = 1 seeds a trained teacher, but this task loads its teacher "
                                         r"from teacher_checkpoint 'digits-smoke-test_resnet.pt': remove one"):
        dataclasses.replace(tiny_task, teacher_seed=1, teacher_checkpoint="digits-smoke-test_resnet.pt")
