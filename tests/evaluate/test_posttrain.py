"""evaluate(): relabel, post-train and one complete record (online and stored KD, the recorded
precision); a distilled folder of the wrong classes, a corrupt image, a permuted foreign folder and
an unknown student are refused with the reason before anything is trained."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cdabench import artifacts, records
from cdabench.cli import main
from cdabench.engine.context import open_context
from cdabench.evaluate.posttrain import evaluate
from tests.fixtures import make_imagefolder, run_cli, squeezed

CPU = torch.device("cpu")
IPC = 2   # the session's distilled sets (conftest.py: `distilled`)


@pytest.mark.slow
def test_unknown_student_is_refused_before_relabel(tiny_task, private_cache, distilled, tmp_path):
    kd = dataclasses.replace(tiny_task.posttrain.kd, mode="stored")
    task = dataclasses.replace(tiny_task, posttrain=dataclasses.replace(tiny_task.posttrain, kd=kd))
    ctx = open_context(task, None, "cpu", private_cache)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        evaluate(ctx, distilled("random"), "nope", "soft", 0)
    assert not (private_cache / "labels").exists(), "a label store was built for a student that does not exist"


@pytest.mark.slow
def test_distilled_folder_with_wrong_classes(capsys, cli_common, distilled, tmp_path):
    external = make_imagefolder(tmp_path / "ext", classes=("a", "b", "c"), per_class=2, size=(8, 8)) / "train"
    code, text = run_cli(capsys, ["evaluate", *cli_common, "--data", str(external), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2
    assert "cannot map the 3 class folders" in text and "10 expected classes" in text

    ours = tmp_path / "ours"
    shutil.copytree(distilled("random"), ours)
    manifest = artifacts.read_json(ours / "manifest.json")
    manifest["classes"] = ["0", "1", "2"]
    artifacts.atomic_write_json(ours / "manifest.json", manifest)
    code, text = run_cli(capsys, ["evaluate", *cli_common, "--data", str(ours), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2 and "another class map (3 classes" in text and "has 10" in text
    assert not (tmp_path / "rec" / "records.jsonl").exists()


@pytest.mark.slow
def test_corrupt_image_in_distilled_folder(capsys, cli_common, distilled, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(distilled("random"), bad)
    (bad / "images" / "3" / "ipc0001.png").write_bytes(b"this is not a png")
    # With our manifest: the changed file is caught by its hash before it is decoded.
    code, text = run_cli(capsys, ["evaluate", *cli_common, "--data", str(bad), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2 and "changed since it was distilled" in text and "bad/images/3/ipc0001.png" in squeezed(text)
    # As a foreign ImageFolder (no manifest): the decoder names the file.
    (bad / "manifest.json").unlink()
    code, text = run_cli(capsys, ["evaluate", *cli_common, "--data", str(bad), "--labels", "hard",
                               "--out", str(tmp_path / "rec")])
    assert code == 2 and "cannot decode image file" in text and "bad/images/3/ipc0001.png" in squeezed(text)
    assert not (tmp_path / "rec" / "records.jsonl").exists()


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

    # A student of 3 epochs on the same set extends that store by one epoch, and one of 1 epoch
    # replays its first: one store for the set, each record hashing the epochs it used.
    longer = evaluate(stored_ctx, data, "resnet18", "soft", 0, epochs=3)
    shorter = evaluate(stored_ctx, data, "resnet18", "soft", 0, epochs=1)
    assert list((private_cache / "labels").iterdir()) == stores
    assert len(list(stores[0].glob("epoch_*.pt"))) == 3
    assert [epoch_file.stat().st_mtime_ns for epoch_file in epoch_files] == \
        [p.stat().st_mtime_ns for p in sorted(stores[0].glob("epoch_*.pt"))[:2]]   # the first two not remade
    assert longer["hashes"]["labels"] == artifacts.read_json(stores[0] / "labels.json")["label_hash"] \
        != stored["hashes"]["labels"]
    first = {"epoch_0000.pt": artifacts.sha256_file(stores[0] / "epoch_0000.pt")}
    assert shorter["hashes"]["labels"] == artifacts.hash_file_map(first)
    assert (longer["teacher_forwards"], shorter["teacher_forwards"]) == (3 * 10 * IPC, 1 * 10 * IPC)

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


def test_bf16_run_records_its_precision(tiny_task_path, private_cache, tmp_path, native_bf16):
    """distil + evaluate under --precision bf16: the manifest and the record say bf16; the fp32 run
    of the same cell says fp32 (the default)."""
    common = ["--task", str(tiny_task_path), "--cache-dir", str(private_cache), "--device", "cpu", "--quiet"]
    for precision in ("bf16", "fp32"):
        flag = ["--precision", precision] if precision == "bf16" else []
        out = tmp_path / f"cda-{precision}"
        assert main(["distill", *common, *flag, "--method", "cda", "--ipc", "1", "--out", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["precision"] == precision and manifest["compiled"] is False   # recover ran eager
        assert main(["evaluate", *common, *flag, "--data", str(out), "--epochs", "1",
                     "--out", str(tmp_path / "runs")]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "runs" / "records.jsonl").read_text().splitlines()]
    assert (first["precision"], first["recover_precision"], first["recover_compiled"]) == ("bf16", "bf16", False)
    assert (second["precision"], second["recover_precision"]) == ("fp32", "fp32")
    assert first["hashes"]["teacher"] != second["hashes"]["teacher"]   # bf16 trains its own teacher


def test_bf16_run_on_emulated_bf16_records_its_precision(private_cache, tmp_path, emulated_bf16):
    """The bf16 run of distil + evaluate where the CPU has no native bf16, on torch's emulated bf16:
    timm's 0.37 M-parameter test_resnet as teacher (trained in fp32 here, passed by --teacher: a
    ResNet-18 trained on emulated bf16 would take half an hour) and student. The manifest, the
    record and the teacher's probe say bf16; the fp32 run of the same cell says fp32."""
    from cdabench.config import load_task
    from cdabench.distill.squeeze import get_teacher
    from tests.fixtures import tiny_task_file

    task = tiny_task_file(tmp_path / "tiny.toml", {"teacher.model": "test_resnet", "recover.sre2l": None,
                                                   "recover.cda.iterations": 2})
    fp32_ctx = open_context(load_task(str(task)), None, "cpu", tmp_path / "cache", "fp32")
    teacher = tmp_path / "teacher.pt"
    torch.save(get_teacher(fp32_ctx).model.state_dict(), teacher)
    common = ["--task", str(task), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet",
              "--teacher", str(teacher)]
    for precision in ("bf16", "fp32"):
        out = tmp_path / f"cda-{precision}"
        assert main(["distill", *common, "--precision", precision, "--method", "cda", "--ipc", "1",
                     "--out", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["precision"] == precision and manifest["compiled"] is False
        assert main(["evaluate", *common, "--precision", precision, "--data", str(out), "--student", "test_resnet",
                     "--epochs", "1", "--out", str(tmp_path / "runs")]) == 0
    bf16, fp32 = [json.loads(line) for line in (tmp_path / "runs" / "records.jsonl").read_text().splitlines()]
    assert (bf16["precision"], bf16["recover_precision"]) == ("bf16", "bf16")
    assert (fp32["precision"], fp32["recover_precision"]) == ("fp32", "fp32")
    assert bf16["hashes"]["images"] != fp32["hashes"]["images"]      # bf16 arithmetic made other images
    assert bf16["hashes"]["teacher"] == fp32["hashes"]["teacher"]    # the one teacher given
