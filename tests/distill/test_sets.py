"""Distilled sets on the tiny digits task (conftest.py): `cdabench distill` for every method writes
the artifact format, selections come from the fit split, sets are deterministic by seed, and bad
requests are refused with the reason. The teacher is trained once per session and shared through
one cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdabench import artifacts
from cdabench.distill.select import herding_order
from cdabench.distill.sets import load_distilled
from cdabench.engine.models import list_models, penultimate_features
from tests.fixtures import run_cli

DIGITS = [str(d) for d in range(10)]
IPC = 2


def _decode(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("L")).copy())[None]


def _files_on_disk(out: Path) -> dict[str, str]:
    images = out / "images"
    return {p.relative_to(images).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(images.rglob("*")) if p.is_file()}


def _hash_file_map(files: dict[str, str]) -> str:
    """images_hash, computed independently: sha256 of the canonical JSON of the sorted (path, hash) list."""
    text = json.dumps(sorted([k, v] for k, v in files.items()), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------- artifact format
@pytest.mark.slow
@pytest.mark.parametrize("method", ["sre2l", "cda", "random", "herding", "full"])
def test_distill_writes_the_artifact_format(method, distilled, tiny_ctx, tiny_teacher):
    out = distilled(method)
    manifest = artifacts.read_json(out / "manifest.json")
    assert manifest["kind"] == "cdabench-distilled" and manifest["format_version"] == 1
    assert manifest["method"] == method and manifest["dataset"] == "digits"
    assert manifest["classes"] == DIGITS == tiny_ctx.classes
    assert manifest["class_folders"] == DIGITS
    assert (manifest["image_size"], manifest["channels"], manifest["seed"]) == (8, 1, 0)
    assert manifest["config"] == artifacts.read_json(out / "distill.json")
    needs_teacher = method in ("sre2l", "cda", "herding")
    if needs_teacher:
        assert manifest["teacher"]["hash"] == tiny_teacher.hash
        assert manifest["teacher"]["probe_top1"] >= 50.0
    else:
        assert manifest["teacher"] is None

    if method == "full":
        assert manifest["full"] is True and manifest["ipc"] is None and manifest["files"] == {}
        assert manifest["images_hash"] == tiny_ctx.data.fingerprint()
        assert not (out / "images").exists()
        return

    files = manifest["files"]
    assert manifest["ipc"] == IPC and manifest["full"] is False
    assert sorted(files) == [f"{c}/ipc{k:04d}.png" for c in DIGITS for k in range(IPC)]
    assert files == _files_on_disk(out)                       # every file listed, hashes of the bytes on disk
    assert manifest["images_hash"] == _hash_file_map(files)
    assert manifest["image_bytes"] == sum((out / "images" / rel).stat().st_size for rel in files)
    for rel in files:
        assert _decode(out / "images" / rel).shape == (1, 8, 8)
    if method in ("sre2l", "cda"):
        crop = manifest["config"]["recover"]["crop"]
        assert crop["kind"] == ("cosine" if method == "cda" else "fixed")
        assert manifest["config"]["recover"]["iterations"] == 5
        markers = sorted(p.name for p in (out / "shards").glob("*.json"))
        assert markers == ["c0000_g0000.json"]                  # 10 classes x IPC 2 in one batch of <= 100
        # The distilled set loads back as the task's training source, labels from the folders.
        bank, loaded = load_distilled(tiny_ctx, out)
        assert bank.images.shape == (10 * IPC, 1, 8, 8)
        assert bank.labels.tolist() == [c for c in range(10) for _ in range(IPC)]
        assert loaded["images_hash"] == manifest["images_hash"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "herding"])
def test_selection_comes_from_the_fit_split(method, distilled, tiny_ctx, tiny_teacher):
    out = distilled(method)
    manifest = artifacts.read_json(out / "manifest.json")
    fit_targets = np.asarray(tiny_ctx.fit.targets)
    fit_images = tiny_ctx.source("fit").images
    selection = manifest["selection"]
    assert sorted(selection) == DIGITS
    for c, name in enumerate(DIGITS):
        chosen = selection[name]
        assert len(chosen) == IPC and len(set(chosen)) == IPC
        assert all(0 <= i < len(tiny_ctx.fit) for i in chosen)
        assert all(fit_targets[i] == c for i in chosen)
        for k, i in enumerate(chosen):   # the file ipcK holds fit image chosen[K], pixel for pixel
            assert torch.equal(_decode(out / "images" / name / f"ipc{k:04d}.png"), fit_images[i])
    if method == "herding":
        # The greedy herding order of the teacher's penultimate features, class by class.
        model = tiny_teacher.model.eval()
        normalizer = tiny_ctx.normalizer()
        for c, name in enumerate(DIGITS):
            members = np.flatnonzero(fit_targets == c)
            with torch.no_grad():
                feats = penultimate_features(model, normalizer(fit_images[members].float() / 255))
            assert selection[name] == members[herding_order(feats, IPC)].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "sre2l"])
def test_distill_is_deterministic_by_seed(method, distilled, tmp_path, cli_common, capsys):
    reference = artifacts.read_json(distilled(method) / "manifest.json")
    for seed, same in ((0, True), (1, False)):
        out = tmp_path / f"seed{seed}"
        code, text = run_cli(capsys, ["distill", *cli_common, "--method", method, "--ipc", str(IPC),
                                   "--seed", str(seed), "--out", str(out)])
        assert code == 0, text
        manifest = artifacts.read_json(out / "manifest.json")
        assert (manifest["images_hash"] == reference["images_hash"]) is same
        assert (manifest["files"] == reference["files"]) is same
        if method == "random":
            assert (manifest["selection"] == reference["selection"]) is same


# ---------------------------------------------------------------- errors
def test_unknown_method_task_student(capsys, cli_common, distilled, tmp_path):
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "nope", "--ipc", "1", "--out", str(tmp_path / "a")])
    assert code == 2 and "unknown method 'nope'" in text
    listed = text.split("known methods are", 1)[1]
    assert all(name in listed for name in ("cda", "sre2l", "random", "herding", "full"))

    code, text = run_cli(capsys, ["distill", "--task", "no-such-task", "--quiet", "--out", str(tmp_path / "b")])
    assert code == 2 and "unknown task 'no-such-task'" in text and "digits" in text

    code, text = run_cli(capsys, ["evaluate", *cli_common, "--data", str(distilled("random")), "--labels", "hard",
                               "--student", "nope", "--out", str(tmp_path / "c")])
    assert code == 2 and "unknown model 'nope'" in text
    assert ", ".join(sorted(list_models())) in text                 # every registered student, by name
    assert not (tmp_path / "c" / "records.jsonl").exists()


def test_ipc_larger_than_a_class(capsys, cli_common, tiny_ctx, tmp_path):
    smallest = int(np.bincount(np.asarray(tiny_ctx.fit.targets)).min())
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "random", "--ipc", str(smallest + 1),
                               "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"IPC {smallest + 1} is larger than class" in text and f"--ipc <= {smallest}" in text
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_data_root(capsys, tmp_path):
    task = tmp_path / "cifar.toml"
    task.write_text('dataset = "cifar10"\nholdout_fraction = 0.1\n')
    code, text = run_cli(capsys, ["distill", "--task", str(task), "--method", "random", "--ipc", "1", "--quiet",
                               "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "cifar10: --data-root is required" in text and "cifar-10-batches-py" in text
    code, text = run_cli(capsys, ["distill", "--task", str(task), "--method", "random", "--ipc", "1", "--quiet",
                               "--device", "cpu", "--data-root", str(tmp_path / "nowhere"),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in text


def test_rerun_into_a_different_configuration_is_refused(capsys, cli_common, tmp_path):
    out = tmp_path / "out"
    base = ["distill", *cli_common, "--method", "random", "--out", str(out)]
    assert run_cli(capsys, [*base, "--ipc", "1", "--seed", "0"])[0] == 0
    first = artifacts.read_json(out / "manifest.json")
    code, text = run_cli(capsys, [*base, "--ipc", "1", "--seed", "1"])
    assert code == 2 and "already holds a different distillation (differs in: seed)" in text
    code, text = run_cli(capsys, [*base, "--ipc", "2", "--seed", "0"])
    assert code == 2 and "differs in: ipc" in text
    assert artifacts.read_json(out / "manifest.json")["files"] == first["files"]  # nothing overwritten
    assert run_cli(capsys, [*base, "--ipc", "1", "--seed", "0"])[0] == 0         # the same run again is fine
    assert artifacts.read_json(out / "manifest.json")["images_hash"] == first["images_hash"]




@pytest.mark.slow
def test_a_resume_that_switched_compile_records_compiled_mixed(tmp_path, inductor):
    """The manifest says how recover's teacher forward ran: `false` (eager), `true` (torch.compile)
    or `"mixed"` when a killed run is resumed with `compile` switched (a setting of how the work
    runs, not of what it computes, so the same --out resumes). Killed after the first of 4 CDA
    shards eager, resumed compiled; each marker says how its shard ran. timm's test_resnet is the
    teacher (inductor compiles it in seconds; a ResNet-18 takes minutes on a small CPU)."""
    from cdabench.config import load_task
    from cdabench.distill.sets import distill
    from cdabench.engine.context import open_context
    from tests.fixtures import interrupt_at, tiny_task_file

    cda = {"iterations": 2, "batch_size": 5, "jitter": 1}
    eager = tiny_task_file(tmp_path / "eager" / "tiny.toml", {"teacher.model": "test_resnet", "recover.sre2l": None,
                                                              "recover.cda": cda})
    compiled = tiny_task_file(tmp_path / "compiled" / "tiny.toml", {"teacher.model": "test_resnet",
                                                                    "recover.sre2l": None,
                                                                    "recover.cda": {**cda, "compile": True}})
    out, cache = tmp_path / "set", tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt), interrupt_at("recover", cda["iterations"] + 1):
        distill(open_context(load_task(str(eager)), None, "cpu", cache), "cda", 2, 0, out)
    assert [p.name for p in (out / "shards").glob("*.json")] == ["c0000_g0000.json"]
    manifest = distill(open_context(load_task(str(compiled)), None, "cpu", cache), "cda", 2, 0, out)
    ran = {p.stem: artifacts.read_json(p)["compiled"] for p in sorted((out / "shards").glob("*.json"))}
    assert ran == {"c0000_g0000": False, "c0000_g0001": True, "c0001_g0000": True, "c0001_g0001": True}
    assert manifest["compiled"] == "mixed"
    assert artifacts.read_json(out / "manifest.json")["compiled"] == "mixed"
    # Run whole either way, the flag is a plain true or false.
    assert distill(open_context(load_task(str(compiled)), None, "cpu", cache), "cda", 2, 0,
                   tmp_path / "whole")["compiled"] is True
