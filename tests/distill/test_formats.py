"""Other methods' distilled sets, read as each method's own code writes them (tests/fixtures.py builds
every fixture in that exact form), and teachers as the field's training scripts save them: what is
read, in which value space, with which labels, and what is refused (with the reason) before anything
trains. Nothing here trains a student; tests/evaluate/test_external.py evaluates every format."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib

import numpy as np
import pytest
import torch

from cdabench.config import ConfigError
from cdabench.data import DataError
from cdabench.distill import fkd as fkd_mod
from cdabench.distill.formats import FORMATS, Format, detect_format, read_shipped, register_format
from cdabench.distill.sets import adhoc_method, load_external
from cdabench.distill.spaces import fit_zca, task_zca
from cdabench.distill.squeeze import load_teacher
from cdabench.engine.augment import AugmentSpec
from cdabench.engine.labels import StoredLabels
from cdabench.engine.train import ImageBank
from tests.fixtures import (normalise, PickleBomb, cifar100_names, class_colour, class_major_labels, numpy_kornia_zca,
                            save_d4m_folder, save_datm, save_dc, save_ddranking, save_fkd_labels, save_mtt,
                            save_sre2l_folder)

IPC = 2


def _external(ctx, path, fmt="auto", space="pixel", **source):
    method = adhoc_method(str(path), fmt, space)
    if source:
        method = dataclasses.replace(method, source=dataclasses.replace(method.source, **source))
    return load_external(ctx, method)


# ------------------------------------------------------------------ the formats
def test_mtt_normalised_tensors_that_require_grad(tiny_ctx, digits_set, tmp_path):
    images01, labels = digits_set
    run = save_mtt(tmp_path / "mtt", normalise(tiny_ctx, images01), labels)
    saved = torch.load(run / "images_best.pt", weights_only=True)
    assert saved.requires_grad                                         # the fixture is the optimised leaf
    assert detect_format(run) == "mtt" and detect_format(run / "images_best.pt") == "mtt"
    ext = _external(tiny_ctx, run, space="normalized")
    assert ext.bank.images.dtype == torch.float32 and not ext.bank.images.requires_grad
    torch.testing.assert_close(ext.bank.images, images01, atol=1e-6, rtol=0)   # back to pixels exactly
    assert torch.equal(ext.bank.labels, labels) and ext.label_source == "hard" and ext.lr is None
    source = ext.manifest["source"]
    assert (source["format"], source["space"], source["reader"]["iteration"]) == ("mtt", "normalized", "best")
    assert sorted(ext.manifest["files"]) == ["images_best.pt", "labels_best.pt"]


def test_mtt_zca_whitened_tensors_and_the_images_zca_file(tiny_ctx, digits_set, tmp_path):
    """images_best.pt of a --zca run holds whitened values; images_zca_best.pt the inverse-whitened
    pixels despite its name (declared zca, it is refused with that reason)."""
    images01, labels = digits_set
    train01 = tiny_ctx.data.train.load_all().float().numpy() / 255
    mean, transform, inverse = numpy_kornia_zca(train01, 0.1)
    flat = images01.reshape(len(images01), -1).double().numpy()
    whitened = torch.from_numpy((flat - mean) @ transform).float().reshape(images01.shape)
    run = save_mtt(tmp_path / "mtt-zca", whitened, labels)
    ext = _external(tiny_ctx, run, space="zca")
    torch.testing.assert_close(ext.bank.images, images01, atol=1e-4, rtol=0)   # unwhitened by the task's ZCA
    assert ext.zca is not None and ext.manifest["source"]["zca_eps"] == 0.1
    # kornia's inverse_transform of the whitened set, saved under MTT's name for it
    inverse_images = torch.from_numpy(((flat - mean) @ transform + mean @ transform) @ inverse).float()
    torch.save(_leaf(inverse_images.reshape(images01.shape)), run / "images_zca_best.pt")
    with pytest.raises(DataError, match="inverse-whitened"):
        _external(tiny_ctx, run / "images_zca_best.pt", space="zca")
    ext = _external(tiny_ctx, run / "images_zca_best.pt", space="pixel")
    torch.testing.assert_close(ext.bank.images, images01, atol=1e-4, rtol=0)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def test_datm_learned_logits_and_lr(tiny_ctx, digits_set, tmp_path):
    images01, labels = digits_set
    logits = torch.nn.functional.one_hot(labels, 10).float() * 4 + 0.1 * torch.randn(len(labels), 10)
    run = save_datm(tmp_path / "datm", normalise(tiny_ctx, images01), logits, 0.0123)
    assert detect_format(run) == "datm"
    ext = _external(tiny_ctx, run, space="normalized")
    assert torch.equal(ext.bank.labels, labels)                          # class-major, implied
    torch.testing.assert_close(ext.logits, logits)
    assert ext.lr == pytest.approx(0.0123) and ext.label_source == "logits"
    assert sorted(ext.manifest["files"]) == ["images_best.pt", "labels_best.pt", "lr_best.pt"]
    assert ext.manifest["source"]["learned_lr_value"] == pytest.approx(0.0123)


def test_dc_res_file_with_two_experiments(tiny_ctx, digits_set, tmp_path):
    images01, labels = digits_set
    second = images01.flip(-1)
    path = save_dc(tmp_path / "dc", [(normalise(tiny_ctx, images01), labels), (normalise(tiny_ctx, second), labels)])
    assert path.name == "res_DC_digits_ConvNet_2ipc.pt" and detect_format(path) == "dc"
    with pytest.raises(Exception, match="numpy"):       # the file really holds numpy scalars
        torch.load(path, weights_only=True)
    first = _external(tiny_ctx, path, space="normalized")
    other = _external(tiny_ctx, path, space="normalized", experiment=1)
    torch.testing.assert_close(first.bank.images, images01, atol=1e-6, rtol=0)
    torch.testing.assert_close(other.bank.images, second, atol=1e-6, rtol=0)
    assert other.manifest["source"]["reader"] == {"experiment": 1, "experiments": 2}
    with pytest.raises(DataError, match="holds 2 experiment"):
        _external(tiny_ctx, path, space="normalized", experiment=2)


def test_ddranking_class_major_tensors(tiny_ctx, digits_set, tmp_path):
    images01, labels = digits_set
    folder = save_ddranking(tmp_path / "ddr", normalise(tiny_ctx, images01), torch.randn(len(labels), 10), 0.01)
    assert detect_format(folder) == "ddranking"
    ext = _external(tiny_ctx, folder, space="normalized")
    assert torch.equal(ext.bank.labels, labels) and ext.lr == pytest.approx(0.01)
    assert ext.manifest["source"]["reader"] == {"labels": "class-major, implied"}
    hard_only = save_ddranking(tmp_path / "ddr-hard", normalise(tiny_ctx, images01))
    ext = _external(tiny_ctx, hard_only, space="normalized")
    assert torch.equal(ext.bank.labels, labels) and ext.logits is None and ext.label_source == "hard"


def test_method_constants_for_a_normalized_set(tiny_ctx, digits_set, tmp_path):
    """DC normalises CIFAR-100 with its own constants: the entry's mean/std undo exactly those."""
    images01, labels = digits_set
    path = save_ddranking(tmp_path / "own", (images01 - 0.5) / 0.25)
    ext = _external(tiny_ctx, path, space="normalized", mean=(0.5,), std=(0.25,))
    torch.testing.assert_close(ext.bank.images, images01, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ folders
def test_d4m_unpadded_integer_folders_keep_2_and_10_apart(tmp_path):
    """D4M names class folders 0, 1, ..., 99 and saves 224 px: sorted names would put `10` third.
    Folder k is class k; the images are resized to the task's size and the resize recorded."""
    classes = cifar100_names()
    labels = torch.tensor([2, 10, *range(100)])      # every class; 2 and 10 twice
    images = torch.stack([torch.tensor(class_colour(int(c)), dtype=torch.float32).view(3, 1, 1).expand(3, 8, 8) / 255
                          for c in labels])
    root = save_d4m_folder(tmp_path / "d4m", images, labels)
    names = sorted(p.name for p in root.iterdir())
    assert names.index("10") < names.index("2")                             # what sorting by name would do
    shipped = read_shipped(root, "imagefolder", 3, 32, classes)
    assert shipped.notes["resized_from"] == [224, 224]
    assert shipped.images.shape[1:] == (3, 32, 32) and len(shipped.images) == 102
    assert shipped.labels.tolist()[:6] == [0, 1, 2, 2, 3, 4]                 # label order, not name order
    for image, label in zip(shipped.images, shipped.labels.tolist()):
        assert tuple(image[:, 16, 16].tolist()) == class_colour(label)   # folder 10 holds class 10's colour


def test_fkd_directory_is_replayed_in_the_relabel_order(tmp_path):
    """FKD labels index the images in torchvision's ImageFolder order (D4M's `10/` before `2/`),
    drawn by RandomSampler(seed 42) across epochs: after import, every replayed view equals the view
    the relabel script labelled, and every stored logit row sits at its own image."""
    classes = cifar100_names()
    labels = torch.tensor([*range(100), 2, 10, 2, 10])
    torch.manual_seed(0)
    images = torch.rand(len(labels), 3, 8, 8)
    root = save_d4m_folder(tmp_path / "d4m", images, labels, size=8)
    shipped = read_shipped(root, "imagefolder", 3, 8, classes)
    x = shipped.images.float() / 255

    class Oracle(torch.nn.Module):   # "teacher": logits that name the mean pixel of the (mixed) view
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

        def forward(self, v):
            return torch.cat([v.mean(dim=(1, 2, 3))[:, None], torch.zeros(len(v), 99)], 1)

    for mix in ("cutmix", "mixup", "none"):
        views = save_fkd_labels(tmp_path / f"fkd-{mix}", root, Oracle(), lambda v: v, epochs=2, batch_size=16, mix=mix)
        first = torch.load(tmp_path / f"fkd-{mix}" / "epoch_0" / "batch_0.tar", weights_only=False)
        assert len(first) == 6 and first[5].dtype == torch.float16
        store, manifest = fkd_mod.import_fkd(tmp_path / f"fkd-{mix}", shipped.paths, root, 8, 8, 42, tmp_path / "cache")
        assert manifest["config"]["mix"] == mix and manifest["config"]["batch_size"] == 16
        replay = StoredLabels(store, AugmentSpec(crop="rrc", flip=True, mix=mix), 8, 1.0, False, 100)
        bank = ImageBank(shipped.images, shipped.labels)
        for epoch in range(2):
            order = torch.from_numpy(replay.epoch_order(epoch, len(bank), None))
            for b in range(0, len(order), 16):
                idx = order[b:b + 16]
                ours = replay.replay_views(x[idx], idx, epoch, bank)
                torch.testing.assert_close(ours, views[epoch][b // 16], atol=1e-4, rtol=0)
                stored = replay._epoch(epoch)["logits"][idx][:, 0].float()
                torch.testing.assert_close(stored, ours.mean(dim=(1, 2, 3)), atol=2e-3, rtol=0)


def test_a_format_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_format(Format("mtt", "again", FORMATS["mtt"].read, FORMATS["mtt"].detect))


# ------------------------------------------------------------------ value spaces
def test_zca_equals_a_hand_computation_of_kornias_formula(tiny_ctx):
    train01 = tiny_ctx.data.train.load_all().float() / 255
    mean, transform, inverse = numpy_kornia_zca(train01.numpy(), 0.1)
    zca = fit_zca(train01, 0.1)
    np.testing.assert_allclose(zca.mean.numpy(), mean, atol=1e-12)
    np.testing.assert_allclose(zca.transform.numpy(), transform, atol=1e-8)
    np.testing.assert_allclose(zca.inverse.numpy(), inverse, atol=1e-8)
    x = train01[:7]
    np.testing.assert_allclose(zca.whiten(x).numpy().reshape(7, -1), (x.reshape(7, -1).double().numpy() - mean) @ transform,
                               atol=1e-8)
    np.testing.assert_allclose(zca.unwhiten(zca.whiten(x)).numpy(), x.double().numpy(), atol=1e-8)
    cached = task_zca(tiny_ctx, 0.1)                 # fitted on the task's training images, then read back
    assert torch.allclose(cached.transform, zca.transform, atol=1e-10)
    assert task_zca(tiny_ctx, 0.1).key == cached.key and (tiny_ctx.cache / "zca" / f"{cached.key}.pt").is_file()


def test_normalised_values_declared_as_pixels_are_refused(tiny_ctx, digits_set, tmp_path):
    images01, labels = digits_set
    run = save_mtt(tmp_path / "mtt", normalise(tiny_ctx, images01), labels)
    with pytest.raises(DataError, match="look like normalized"):
        _external(tiny_ctx, run, space="pixel")
    pixels = save_mtt(tmp_path / "pixels", images01, labels)
    with pytest.raises(DataError, match="none of them is negative"):
        _external(tiny_ctx, pixels, space="normalized")


# ------------------------------------------------------------------ nothing read may run code
def test_a_pickle_bomb_set_is_refused_and_never_runs(tiny_ctx, tmp_path):
    marker = tmp_path / "bomb-went-off"
    path = tmp_path / "set.pt"
    torch.save({"images": torch.zeros(20, 1, 8, 8), "labels": class_major_labels(10, 2), "x": PickleBomb(marker)}, path)
    with pytest.raises(DataError, match="posix.system|os.system|nt.system"):
        _external(tiny_ctx, path)
    assert not marker.exists()
    mtt = save_mtt(tmp_path / "mtt", torch.zeros(20, 1, 8, 8), class_major_labels(10, 2))
    torch.save(PickleBomb(marker), mtt / "labels_best.pt")
    with pytest.raises(DataError, match="refuses"):
        _external(tiny_ctx, mtt)
    assert not marker.exists()


def _state(teacher):
    return {k: v.detach().clone() for k, v in teacher.model.state_dict().items()}


def test_teachers_as_torchvision_and_timm_training_scripts_save_them(tiny_ctx, tiny_teacher, tmp_path):
    state = _state(tiny_teacher)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)
    args = argparse.Namespace(model="resnet18", lr=0.2, epochs=50, batch_size=256, data_path="/data/tiny")
    reference = tmp_path / "checkpoint.pth"   # torchvision references/classification/train.py
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "epoch": 49, "args": args}, reference)
    timm_ckpt = tmp_path / "model_best.pth.tar"   # timm train.py's CheckpointSaver
    torch.save({"epoch": 49, "arch": "resnet18", "state_dict": state, "optimizer": optimizer.state_dict(),
                "version": 2, "args": args, "metric": 59.6}, timm_ckpt)
    for path, kind in ((reference, "torchvision reference script"), (timm_ckpt, "timm train.py")):
        teacher = load_teacher(tiny_ctx, path)
        assert teacher.info["checkpoint_format"] == kind and teacher.info["probe_top1"] >= 50.0
        for name, value in teacher.model.state_dict().items():
            assert torch.equal(value, state[name])


def test_a_teacher_holding_any_other_global_is_refused_with_it_named(tiny_ctx, tiny_teacher, tmp_path):
    marker = tmp_path / "bomb-went-off"
    args = argparse.Namespace(model="resnet18", output=pathlib.PurePosixPath("/runs"))
    path = tmp_path / "with-path.pth"
    torch.save({"model": _state(tiny_teacher), "args": args}, path)
    with pytest.raises(DataError, match="PurePosixPath") as info:
        load_teacher(tiny_ctx, path)
    assert "argparse.Namespace" in str(info.value)
    bomb = tmp_path / "bomb.pth"
    torch.save({"model": _state(tiny_teacher), "args": argparse.Namespace(evil=PickleBomb(marker))}, bomb)
    with pytest.raises(DataError, match="system"):
        load_teacher(tiny_ctx, bomb)
    assert not marker.exists()


def test_labels_method_needs_an_external_set(tiny_task, private_cache, distilled):
    from cdabench.engine.context import open_context
    from cdabench.evaluate.posttrain import evaluate
    ctx = open_context(tiny_task, None, "cpu", private_cache)
    with pytest.raises(ConfigError, match="--labels method"):
        evaluate(ctx, distilled("random"), "resnet18", "method", 0)


def test_sre2l_folder_reads_as_an_imagefolder(tiny_ctx, digits_set, tmp_path):
    images01, labels = digits_set
    root = save_sre2l_folder(tmp_path / "sre2l", images01, labels)
    assert detect_format(root) == "imagefolder"
    ext = _external(tiny_ctx, root)
    assert torch.equal(ext.bank.images, (images01 * 255).round().to(torch.uint8))
    assert torch.equal(ext.bank.labels, labels) and ext.manifest["ipc"] == IPC


def test_gvbsm_indices_are_used_and_other_layouts_refused(tmp_path):
    """G-VBSM appends the batch's dataset indices (a 7th element): the import uses them and gives the
    store the sampler replay gives; a batch file of any other length (EDC's patch order) is refused."""
    classes = cifar100_names()
    labels = torch.arange(100)
    torch.manual_seed(1)
    root = save_d4m_folder(tmp_path / "set", torch.rand(100, 3, 8, 8), labels, size=8)
    shipped = read_shipped(root, "imagefolder", 3, 8, classes)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1), torch.nn.Flatten(), torch.nn.Linear(64, 100))
    save_fkd_labels(tmp_path / "fkd", root, net, lambda v: v, epochs=2, batch_size=32)
    orders = fkd_mod.sampler_orders(100, 2, 42)
    for e in range(2):
        (tmp_path / "gvbsm" / f"epoch_{e}").mkdir(parents=True)
        for b, path in enumerate(sorted((tmp_path / "fkd" / f"epoch_{e}").iterdir(), key=lambda p: int(p.stem[6:]))):
            batch = torch.load(path, weights_only=False)
            batch.append(torch.tensor(orders[e][b * 32:(b + 1) * 32]))
            torch.save(batch, tmp_path / "gvbsm" / f"epoch_{e}" / path.name)
    replayed, _ = fkd_mod.import_fkd(tmp_path / "fkd", shipped.paths, root, 8, 8, 42, tmp_path / "c1")
    indexed, _ = fkd_mod.import_fkd(tmp_path / "gvbsm", shipped.paths, root, 8, 8, 42, tmp_path / "c2")
    for e in range(2):
        a, b = (torch.load(r / f"epoch_{e:04d}.pt", weights_only=True) for r in (replayed, indexed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = torch.load(tmp_path / "fkd" / "epoch_0" / "batch_0.tar", weights_only=False)
    torch.save(batch + [torch.arange(32), torch.arange(4)], tmp_path / "fkd" / "epoch_0" / "batch_0.tar")
    with pytest.raises(DataError, match="8 elements.*EDC"):
        fkd_mod.import_fkd(tmp_path / "fkd", shipped.paths, root, 8, 8, 42, tmp_path / "c3")


def test_class_order_maps_a_methods_label_indices_and_logit_columns(tiny_ctx, digits_set, tmp_path):
    """A method that numbered the digits 9..0: its label k and logit column k are task class 9 - k."""
    images01, labels = digits_set
    theirs = 9 - labels
    logits = torch.nn.functional.one_hot(theirs, 10).float()
    torch.save({"images": images01, "labels": theirs, "logits": logits}, tmp_path / "set.pt")
    ext = _external(tiny_ctx, tmp_path / "set.pt", class_order=tuple(str(d) for d in range(9, -1, -1)))
    assert torch.equal(ext.bank.labels, labels)
    assert torch.equal(ext.logits.argmax(dim=1), labels)
