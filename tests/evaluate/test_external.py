"""Other methods' sets evaluated end to end on the tiny digits task (conftest.py), each built in the
exact form its method ships (tests/fixtures.py): every record says which format, value space, label
source, learning rate and label agreement it used; a class-shuffled tensor set is refused by the
label-agreement guard; an external method entry runs in the cross-arch suite beside ours and shows
in the leaderboard (with its provenance) and the check. The ConvNet student learns."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdabench import packaged
from cdabench.cli import main
from cdabench.config import load_method
from cdabench.engine.augment import AugmentSpec
from cdabench.engine.labels import HardLabels
from cdabench.engine.models import create_model
from cdabench.engine.train import evaluate_model, train_model
from tests.fixtures import (normalise, numpy_kornia_zca, run_cli, save_d4m_folder, save_datm, save_dc,
                            save_ddranking, save_fkd_labels, save_mtt, save_sre2l_folder, suite_file, write_toml)

IPC = 2


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def _entry(path: Path, source: dict, citation: str = "a test fixture") -> Path:
    return write_toml(path, {"kind": "external", "description": "fixture", "citation": citation, "source": source})


def _evaluate(cli_common, data, out, *flags) -> dict:
    assert main(["evaluate", *cli_common, "--data", str(data), "--epochs", "1", "--out", str(out), *flags]) == 0
    return _records(out)[-1]


@pytest.mark.slow
def test_every_format_evaluates_and_its_record_says_what_was_used(tiny_ctx, tiny_teacher, digits_set, cli_common,
                                                                  tmp_path):
    images01, labels = digits_set
    out = tmp_path / "records"
    normalised = normalise(tiny_ctx, images01)

    # The first-contact case: a random set as {"images", "labels"} in one .pt file.
    torch.save({"images": images01, "labels": labels}, tmp_path / "set.pt")
    r = _evaluate(cli_common, tmp_path / "set.pt", out)
    assert (r["source"]["format"], r["source"]["space"], r["labels"], r["method"]) == ("tensor-dict", "pixel", "soft",
                                                                                        "external")
    assert r["label_agreement"] >= 90.0 and r["num_images"] == 20 and r["ipc"] == IPC

    # MTT, normalised, trained on its own (hard) labels.
    mtt = save_mtt(tmp_path / "mtt", normalised, labels)
    r = _evaluate(cli_common, mtt, out, "--space", "normalized", "--labels", "method")
    assert (r["source"]["format"], r["source"]["space"], r["label_protocol"]) == ("mtt", "normalized", "method-hard")
    assert r["recipe"]["lr"] == tiny_ctx.task.posttrain.recipe.lr and r["source"]["learned_lr_value"] is None

    # MTT with --zca: whitened values; the student and the test images are whitened too.
    train01 = tiny_ctx.data.train.load_all().float().numpy() / 255
    mean, transform, _ = numpy_kornia_zca(train01, 0.1)
    whitened = (images01.reshape(20, -1).double().numpy() - mean) @ transform
    zca = save_mtt(tmp_path / "mtt-zca", torch.from_numpy(whitened).float().reshape(images01.shape), labels)
    r = _evaluate(cli_common, zca, out, "--space", "zca")
    assert (r["source"]["space"], r["source"]["zca_eps"], r["label_protocol"]) == ("zca", 0.1, "online-kd")
    assert r["label_agreement"] >= 90.0

    # DATM: learned logits and learning rate, used as given by a method-label cell.
    logits = torch.nn.functional.one_hot(labels, 10).float() * 5
    datm = save_datm(tmp_path / "datm", normalised, logits, 0.004)
    r = _evaluate(cli_common, datm, out, "--space", "normalized", "--labels", "method")
    assert (r["source"]["format"], r["label_protocol"]) == ("datm", "method-logits")
    assert r["recipe"]["lr"] == r["source"]["learned_lr_value"] == pytest.approx(0.004)   # float32, as saved
    assert r["source"]["temperature"] == 1.0 and r["source"]["learned_lr_value"] == pytest.approx(0.004)

    # DC res file, second experiment, through a method entry.
    res = save_dc(tmp_path / "dc", [(normalised.flip(-1), labels), (normalised, labels)])
    entry = _entry(tmp_path / "dm-digits.toml", {"path": f"dc/{res.name}", "format": "dc", "space": "normalized",
                                                  "experiment": 1, "ipc": IPC})
    r = _evaluate(cli_common, entry, out)
    assert (r["method"], r["source"]["format"], r["source"]["reader"]["experiment"]) == ("dm-digits", "dc", 1)
    assert r["source"]["citation"] == "a test fixture" and r["source"]["entry"] == str(entry)

    # DD-Ranking's class-major tensors with soft labels and lr.
    ddr = save_ddranking(tmp_path / "ddr", normalised, logits, 0.004)
    r = _evaluate(cli_common, ddr, out, "--space", "normalized", "--labels", "method")
    assert (r["source"]["format"], r["label_protocol"]) == ("ddranking", "method-logits")

    # D4M: unpadded integer folders at 224 px, resized to the task's 8 px.
    d4m = save_d4m_folder(tmp_path / "d4m", images01, labels)
    r = _evaluate(cli_common, d4m, out, "--format", "imagefolder")
    assert r["source"]["reader"]["resized_from"] == [224, 224] and r["label_agreement"] >= 80.0

    # SRe2L/CDA new000/ folder with its FKD soft-label directory (6-element batch files, CutMix).
    sre2l = save_sre2l_folder(tmp_path / "sre2l", images01, labels)
    normalize = tiny_ctx.normalizer()
    tiny_teacher.model.eval()
    save_fkd_labels(tmp_path / "fkd", sre2l, tiny_teacher.model, normalize, epochs=2, batch_size=8)
    r = _evaluate(cli_common, sre2l, out, "--fkd", str(tmp_path / "fkd"), "--labels", "method")
    fkd_bytes = sum(p.stat().st_size for p in (tmp_path / "fkd").rglob("*.tar"))
    assert (r["label_protocol"], r["label_bytes"], r["teacher_forwards"]) == ("method-fkd", fkd_bytes, 0)
    assert r["source"]["fkd"]["config"] == {"epochs": 2, "batch_size": 8, "seed": 42, "mix": "cutmix",
                                            "input_size": 8, "source": "fkd"}
    assert r["hashes"]["labels"] == r["source"]["fkd"]["label_hash"]
    for record in _records(out):
        assert 0.0 <= record["top1"] <= 100.0 and np.isfinite(record["final_loss"])


def test_a_class_shuffled_tensor_set_is_refused_by_the_guard(tiny_ctx, tiny_teacher, digits_set, cli_common, tmp_path,
                                                              capsys):
    images01, labels = digits_set
    torch.save({"images": images01, "labels": (labels + 1) % 10}, tmp_path / "shuffled.pt")
    code, text = run_cli(capsys, ["evaluate", *cli_common, "--data", str(tmp_path / "shuffled.pt"), "--epochs", "1",
                                  "--out", str(tmp_path / "out")])
    assert code == 2 and "label-agreement guard" in text and "permuted" in text
    assert not (tmp_path / "out" / "records.jsonl").exists()


def test_the_convnet_learns(tiny_ctx):
    """DC/MTT's ConvNet (depth 3 at 8 px) trained on the real fit split beats chance by far."""
    recipe = dataclasses.replace(tiny_ctx.task.posttrain.recipe_for("convnet"), epochs=3, batch_size=64,
                                 optimizer="adamw", lr=0.003, augment=AugmentSpec(crop="none", flip=False))
    torch.manual_seed(0)
    model = create_model("convnet", 10, 1, 8)
    before = evaluate_model(model, tiny_ctx.source("heldout"), tiny_ctx.normalizer(), tiny_ctx.device)["top1"]
    train_model(model, tiny_ctx.source("fit"), HardLabels(recipe.augment, 8), recipe, tiny_ctx.normalizer(),
                tiny_ctx.device, 0, 8)
    after = evaluate_model(model, tiny_ctx.source("heldout"), tiny_ctx.normalizer(), tiny_ctx.device)["top1"]
    assert before < 30.0 and after >= 80.0


@pytest.mark.slow
def test_an_external_entry_runs_in_the_suite_leaderboard_and_check(tiny_task_path, private_cache, digits_set,
                                                                   tiny_ctx, tmp_path, capsys):
    images01, labels = digits_set
    logits = torch.nn.functional.one_hot(labels, 10).float() * 5
    save_datm(tmp_path / "sets" / "datm", normalise(tiny_ctx, images01), logits, 0.002)
    entry = _entry(tmp_path / "sets" / "datm-digits-ipc2.toml",
                   {"path": "datm", "format": "datm", "space": "normalized", "labels": "logits", "ipc": IPC},
                   citation="Guo et al., ICLR 2024")
    suite = suite_file(tmp_path / "ext.toml", tiny_task_path, methods=["random", str(entry)], hard_label_methods=[])
    common = ["--cache-dir", str(private_cache), "--device", "cpu", "--quiet", "--workers", "1"]
    out = tmp_path / "run"
    assert main(["run", "--suite", str(suite), *common, "--out", str(out)]) == 0
    rows = _records(out)
    cells = sorted((r["method"], r["labels"]) for r in rows)
    assert cells == [("datm-digits-ipc2", "method"), ("datm-digits-ipc2", "soft"), ("random", "soft")]
    method_cell = next(r for r in rows if r["labels"] == "method")
    assert method_cell["recipe"]["lr"] == pytest.approx(0.002) and method_cell["source"]["citation"] == "Guo et al., ICLR 2024"
    assert main(["run", "--suite", str(suite), *common, "--out", str(out)]) == 0   # resumes: nothing re-runs
    assert len(_records(out)) == 3
    assert main(["leaderboard", "--runs", str(out), "--out", str(tmp_path / "lb"), "--no-plots"]) == 0
    page = (tmp_path / "lb" / "tiny.md").read_text()
    assert "## External methods" in page and "Guo et al., ICLR 2024" in page and "datm-digits-ipc2 (method)" in page
    soft = next(r for r in rows if r["method"] == "datm-digits-ipc2" and r["labels"] == "soft")
    targets = tmp_path / "targets.csv"
    targets.write_text("task,method,ipc,student,labels,target_top1,tolerance\n"
                       f"tiny,datm-digits-ipc2,{IPC},resnet18,soft,{soft['top1']:.2f},1.0\n")
    code, text = run_cli(capsys, ["check", "--suite", str(suite), "--records", str(out), "--targets", str(targets)])
    assert code == 0 and "OK tiny datm-digits-ipc2 ipc2 resnet18 soft" in text


def test_the_packaged_example_entries_load():
    names = packaged.names("external")
    assert {"mtt-cifar10-ipc10", "datm-cifar10-ipc10", "dc-cifar10-ipc10", "ddranking-cifar10-ipc10",
            "rded-tiny-imagenet-ipc50", "cda-imagenet-1k-ipc50-fkd"} <= set(names)
    for name in names:
        method = load_method(str(packaged.builtin("external", f"{name}.toml")))
        assert method.kind == "external" and method.citation and method.source.ipc


def test_the_cifar10_task_uses_the_fields_constants():
    """DC utils.py, MTT utils.py, DD-Ranking utils/data.py: CIFAR-10 mean and std (also in
    docs/methods.md's dataset table, which tests/data/test_datasets.py compares with the registry)."""
    from cdabench.config import load_task
    from cdabench.data.registry import get_spec
    task = load_task("cifar10")
    spec = get_spec(task.dataset)
    assert (task.dataset, spec.mean, spec.std) == ("cifar10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    convnet = task.posttrain.recipe_for("convnet")
    assert (convnet.optimizer, convnet.lr, convnet.momentum, convnet.weight_decay, convnet.epochs,
            convnet.batch_size) == ("sgd", 0.01, 0.9, 5e-4, 1000, 256)
