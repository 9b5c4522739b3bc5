"""End to end on the tiny digits task (conftest.py): `cdabench distill` for every method writes the
artifact format, selections come from the fit split, errors are clear, and `evaluate` appends
complete records. The teacher is trained once per session and shared through one cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdabench import artifacts, records
from cdabench.cli import main
from cdabench.config import load_method, load_task, recover_config
from cdabench.distill.select import herding_order, select_random
from cdabench.distill.sets import load_distilled
from cdabench.distill.squeeze import load_teacher
from cdabench.engine.context import open_context
from cdabench.engine.models import create_model, penultimate_features
from cdabench.evaluate.posttrain import evaluate

from tests.fixtures import make_imagefolder

DIGITS = [str(d) for d in range(10)]
IPC = 2


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI; return its exit code and everything it printed, whitespace-normalised
    (rich wraps long messages at the console width)."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def _squeezed(text: str) -> str:
    """The text without any whitespace: rich may fold a long path in the middle."""
    return "".join(text.split())


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


# -------------------------------------------------------------- the task
def test_digits_task_shrinks_and_resolves_methods():
    task = load_task("digits")
    small = dataclasses.replace(
        task, teacher=dataclasses.replace(task.teacher, epochs=3),
        recover={k: dataclasses.replace(v, iterations=5) for k, v in task.recover.items()},
        posttrain=dataclasses.replace(task.posttrain, recipe=dataclasses.replace(task.posttrain.recipe, epochs=2)))
    assert small.teacher.epochs == 3 and small.posttrain.recipe_for("resnet18").epochs == 2
    cda, sre2l = recover_config(small, load_method("cda")), recover_config(small, load_method("sre2l"))
    assert cda.iterations == sre2l.iterations == 5
    assert (cda.crop.kind, cda.crop.milestone) == ("cosine", 1.0)     # the papers' CDA runs
    assert (sre2l.crop.kind, sre2l.crop.min_scale) == ("fixed", 0.08)
    assert (cda.lr, cda.r_bn, cda.first_bn_multiplier) == (0.25, 0.01, 10.0)
    assert load_method("random").kind == "select" and load_method("herding").strategy == "herding"


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


def test_random_selection_is_seeded():
    targets = np.repeat(np.arange(4), 20)
    a, b, c = select_random(targets, 5, 0), select_random(targets, 5, 0), select_random(targets, 5, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    for k, chosen in a.items():
        assert len(set(chosen.tolist())) == 5 and np.all(targets[chosen] == k)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "sre2l"])
def test_distill_is_deterministic_by_seed(method, distilled, tmp_path, cli_common, capsys):
    reference = artifacts.read_json(distilled(method) / "manifest.json")
    for seed, same in ((0, True), (1, False)):
        out = tmp_path / f"seed{seed}"
        code, text = _run(capsys, ["distill", *cli_common, "--method", method, "--ipc", str(IPC),
                                   "--seed", str(seed), "--out", str(out)])
        assert code == 0, text
        manifest = artifacts.read_json(out / "manifest.json")
        assert (manifest["images_hash"] == reference["images_hash"]) is same
        assert (manifest["files"] == reference["files"]) is same
        if method == "random":
            assert (manifest["selection"] == reference["selection"]) is same


def _unit(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_herding_order_on_hand_made_features():
    # Mean of the normalised features points at 45 degrees: the diagonal comes first; then (1,0)
    # and (0,1) are equally good and the tie goes to the lower index.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert herding_order(features, 3) == [2, 0, 1]
    assert herding_order(features * torch.tensor([[5.0], [1.0], [0.1]]), 3) == [2, 0, 1]  # L2-normalised first
    # 0, 20, 25 and 90 degrees: the mean is at ~32 degrees. After 25 and 20, herding takes 90
    # (which pulls the running mean back up) before 0, although 0 is nearer the mean than 90.
    features = _unit([0, 20, 25, 90])
    nearest = torch.argsort(((features - features.mean(0)) ** 2).sum(1)).tolist()
    assert nearest == [2, 1, 0, 3]
    assert herding_order(features, 4) == [2, 1, 3, 0]
    assert herding_order(features, 2) == [2, 1]


# ---------------------------------------------------------------- errors
def test_unknown_method_task_student(capsys, cli_common, distilled, tmp_path):
    code, text = _run(capsys, ["distill", *cli_common, "--method", "nope", "--ipc", "1", "--out", str(tmp_path / "a")])
    assert code == 2 and "unknown method 'nope'" in text
    listed = text.split("known methods are", 1)[1]
    assert all(name in listed for name in ("cda", "sre2l", "random", "herding", "full"))

    code, text = _run(capsys, ["distill", "--task", "no-such-task", "--quiet", "--out", str(tmp_path / "b")])
    assert code == 2 and "unknown task 'no-such-task'" in text and "digits" in text

    code, text = _run(capsys, ["evaluate", *cli_common, "--data", str(distilled("random")), "--labels", "hard",
                               "--student", "nope", "--out", str(tmp_path / "c")])
    assert code == 2 and "unknown model 'nope'" in text
    assert "deit_tiny, mobilenetv2, resnet101, resnet18, resnet50" in text
    assert not (tmp_path / "c" / "records.jsonl").exists()


@pytest.mark.slow
def test_unknown_student_is_refused_before_relabel(tiny_task, private_cache, distilled, tmp_path):
    kd = dataclasses.replace(tiny_task.posttrain.kd, mode="stored")
    task = dataclasses.replace(tiny_task, posttrain=dataclasses.replace(tiny_task.posttrain, kd=kd))
    ctx = open_context(task, None, "cpu", private_cache)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        evaluate(ctx, distilled("random"), "nope", "soft", 0)
    assert not (private_cache / "labels").exists(), "a label store was built for a student that does not exist"


def test_ipc_larger_than_a_class(capsys, cli_common, tiny_ctx, tmp_path):
    smallest = int(np.bincount(np.asarray(tiny_ctx.fit.targets)).min())
    code, text = _run(capsys, ["distill", *cli_common, "--method", "random", "--ipc", str(smallest + 1),
                               "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"IPC {smallest + 1} is larger than class" in text and f"--ipc <= {smallest}" in text
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_distilled_folder_with_wrong_classes(capsys, cli_common, distilled, tmp_path):
    external = make_imagefolder(tmp_path / "ext", classes=("a", "b", "c"), per_class=2, size=(8, 8)) / "train"
    code, text = _run(capsys, ["evaluate", *cli_common, "--data", str(external), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2
    assert "cannot map the 3 class folders" in text and "10 expected classes" in text

    ours = tmp_path / "ours"
    shutil.copytree(distilled("random"), ours)
    manifest = artifacts.read_json(ours / "manifest.json")
    manifest["classes"] = ["0", "1", "2"]
    artifacts.atomic_write_json(ours / "manifest.json", manifest)
    code, text = _run(capsys, ["evaluate", *cli_common, "--data", str(ours), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2 and "another class map (3 classes" in text and "has 10" in text
    assert not (tmp_path / "rec" / "records.jsonl").exists()


def test_teacher_with_wrong_class_count(capsys, cli_common, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "five.pt"
    torch.save(create_model("resnet18", 5, 1, 8).state_dict(), path)
    code, text = _run(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(path),
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
    code, text = _run(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(bad),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and "class-order guard" in text and "do not match the dataset's class order" in text
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_corrupt_image_in_distilled_folder(capsys, cli_common, distilled, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(distilled("random"), bad)
    (bad / "images" / "3" / "ipc0001.png").write_bytes(b"this is not a png")
    # With our manifest: the changed file is caught by its hash before it is decoded.
    code, text = _run(capsys, ["evaluate", *cli_common, "--data", str(bad), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2 and "changed since it was distilled" in text and "bad/images/3/ipc0001.png" in _squeezed(text)
    # As a foreign ImageFolder (no manifest): the decoder names the file.
    (bad / "manifest.json").unlink()
    code, text = _run(capsys, ["evaluate", *cli_common, "--data", str(bad), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2 and "cannot decode image file" in text and "bad/images/3/ipc0001.png" in _squeezed(text)
    assert not (tmp_path / "rec" / "records.jsonl").exists()


def test_missing_data_root(capsys, tmp_path):
    task = tmp_path / "cifar.toml"
    task.write_text('dataset = "cifar10"\nholdout_fraction = 0.1\n')
    code, text = _run(capsys, ["distill", "--task", str(task), "--method", "random", "--ipc", "1", "--quiet",
                               "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "cifar10: --data-root is required" in text and "cifar-10-batches-py" in text
    code, text = _run(capsys, ["distill", "--task", str(task), "--method", "random", "--ipc", "1", "--quiet",
                               "--device", "cpu", "--data-root", str(tmp_path / "nowhere"),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in text


def test_rerun_into_a_different_configuration_is_refused(capsys, cli_common, tmp_path):
    out = tmp_path / "out"
    base = ["distill", *cli_common, "--method", "random", "--out", str(out)]
    assert _run(capsys, [*base, "--ipc", "1", "--seed", "0"])[0] == 0
    first = artifacts.read_json(out / "manifest.json")
    code, text = _run(capsys, [*base, "--ipc", "1", "--seed", "1"])
    assert code == 2 and "already holds a different distillation (differs in: seed)" in text
    code, text = _run(capsys, [*base, "--ipc", "2", "--seed", "0"])
    assert code == 2 and "differs in: ipc" in text
    assert artifacts.read_json(out / "manifest.json")["files"] == first["files"]  # nothing overwritten
    assert _run(capsys, [*base, "--ipc", "1", "--seed", "0"])[0] == 0         # the same run again is fine
    assert artifacts.read_json(out / "manifest.json")["images_hash"] == first["images_hash"]


# ----------------------------------------------------------------- records
def _check_record(record: dict, manifest: dict, teacher_hash: str) -> None:
    assert all(k in record for k in records.REQUIRED)
    assert record["schema_version"] == records.SCHEMA_VERSION
    assert record["task"] == "tiny" and record["student"] == "resnet18" and record["method"] == manifest["method"] and record["ipc"] == IPC
    assert record["labels"] == "soft" and record["seed"] == 0 and record["epochs"] == 2
    assert record["metric"] == "last-epoch" and record["num_images"] == 10 * IPC
    assert 0.0 <= record["top1"] <= record["top5"] <= 100.0
    assert record["image_bytes"] == manifest["image_bytes"]
    assert record["hashes"]["images"] == manifest["images_hash"]
    assert record["hashes"]["teacher"] == teacher_hash
    assert set(record["seconds"]) >= {"relabel", "posttrain"}
    assert math.isfinite(record["final_loss"])
    assert record["record_hash"] == records.record_id(record)


@pytest.mark.slow
def test_evaluate_returns_records_online_and_stored(tiny_task, private_cache, distilled, tiny_teacher, tmp_path):
    """evaluate() returns its record and writes none; the caller appends it (the CLI, the suites)."""
    out = tmp_path / "records"
    data = distilled("cda")
    manifest = artifacts.read_json(data / "manifest.json")

    online_ctx = open_context(tiny_task, None, "cpu", private_cache)
    online = evaluate(online_ctx, data, "resnet18", "soft", 0)
    assert "record_hash" not in online and not list(data.rglob("records.jsonl"))
    online = records.append_record(out / "records.jsonl", online)
    _check_record(online, manifest, tiny_teacher.hash)
    assert online["label_protocol"] == "online-kd" and online["label_bytes"] == 0
    assert online["hashes"]["labels"] is None
    assert online["teacher_forwards"] == 2 * 10 * IPC          # the teacher labels every view of every epoch
    assert online["kd"]["mode"] == "online"

    kd = dataclasses.replace(tiny_task.posttrain.kd, mode="stored")
    stored_ctx = open_context(dataclasses.replace(tiny_task, posttrain=dataclasses.replace(tiny_task.posttrain, kd=kd)),
                              None, "cpu", private_cache)
    stored = records.append_record(out / "records.jsonl", evaluate(stored_ctx, data, "resnet18", "soft", 0))
    _check_record(stored, manifest, tiny_teacher.hash)
    assert stored["label_protocol"] == "stored-kd" and stored["kd"]["mode"] == "stored"
    stores = list((private_cache / "labels").iterdir())
    assert len(stores) == 1
    epoch_files = sorted(stores[0].glob("epoch_*.pt"))
    assert len(epoch_files) == 2                                # one per post-train epoch
    assert stored["label_bytes"] == sum(p.stat().st_size for p in epoch_files) > 0
    assert stored["hashes"]["labels"] == artifacts.read_json(stores[0] / "labels.json")["label_hash"]
    assert stored["teacher_forwards"] == 2 * 10 * IPC

    on_disk = records.read_records(out / "records.jsonl")
    assert on_disk == [online, stored]


def _external_copy(src: Path, dst: Path, permutation: list[int] | None = None) -> Path:
    """The images of a distilled set as a bare ImageFolder (no manifest), folders optionally
    renamed so that class k's images sit in the folder of class permutation[k]."""
    folders = sorted(p.name for p in (src / "images").iterdir())
    for k, name in enumerate(folders):
        target = folders[permutation[k]] if permutation else name
        shutil.copytree(src / "images" / name, dst / target)
    return dst


def test_label_agreement_guard_refuses_a_permuted_foreign_folder(capsys, cli_common, distilled, tmp_path):
    random_set = distilled("random")
    shifted = [(k + 1) % 10 for k in range(10)]
    permuted = _external_copy(random_set, tmp_path / "permuted", shifted)
    argv = ["evaluate", *cli_common, "--data", str(permuted), "--epochs", "1", "--out", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "label-agreement guard" in err and "permuted" in err and "--allow-label-mismatch" in err
    assert not (tmp_path / "runs" / "records.jsonl").exists()
    # The explicit override trains anyway, and the record says how little the teacher agreed.
    assert main(argv + ["--allow-label-mismatch"]) == 0
    # The same folder with the right names passes, and the agreement is recorded as measured.
    right = _external_copy(random_set, tmp_path / "right")
    assert main(["evaluate", *cli_common, "--data", str(right), "--epochs", "1", "--out", str(tmp_path / "runs")]) == 0
    mislabelled, correct = [json.loads(line) for line in (tmp_path / "runs" / "records.jsonl").read_text().splitlines()]
    assert mislabelled["label_agreement"] <= 20.0 and mislabelled["method"] == "external"
    assert correct["label_agreement"] >= 90.0
