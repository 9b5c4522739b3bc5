"""Relabel: the KD losses, and the FKD-style label store (methods.md section 4): stored once,
replayed exactly, independent of the replay batch size, byte-stable, resumable."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from cdabench import artifacts
from cdabench.schema import AugmentSpec
from cdabench.engine.labels import (LabelStoreConfig, StoredLabels, build_label_store, epoch_file, kd_loss,
                                     masked_probs, mixed_cross_entropy)
from cdabench.engine.train import ImageBank, Normalizer

from tests.fixtures import make_tiny_bn_net

NUM_CLASSES, N, SIZE, T = 5, 10, 8, 4.0
NORMALIZER = Normalizer((0.5,), (0.25,), torch.device("cpu"))
CPU = torch.device("cpu")


# ------------------------------------------------------------------ losses
def test_kd_loss_equals_hand_computation():
    torch.manual_seed(0)
    student, teacher_logits = torch.randn(4, 6), torch.randn(4, 6)
    temperature = 3.0
    p = torch.softmax(teacher_logits.double() / temperature, dim=1)
    log_q = torch.log_softmax(student.double() / temperature, dim=1)
    kl = sum((p[i, c] * (math.log(p[i, c]) - log_q[i, c])).item() for i in range(4) for c in range(6)) / 4
    probs = torch.softmax(teacher_logits / temperature, dim=1)
    assert kd_loss(student, probs, temperature, t_squared=False).item() == pytest.approx(kl, rel=1e-5)
    assert kd_loss(student, probs, temperature, t_squared=True).item() == pytest.approx(kl * 9, rel=1e-5)
    # KL of a distribution with itself is zero.
    assert kd_loss(teacher_logits, probs, temperature, False).item() == pytest.approx(0.0, abs=1e-6)


def test_mixed_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(5, 4)
    y, y2 = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    plain = F.cross_entropy(logits, y)
    assert mixed_cross_entropy(logits, (y, y2, torch.ones(5))).item() == pytest.approx(plain.item(), rel=1e-6)
    lam = torch.tensor([0.3] * 5)
    log_p = torch.log_softmax(logits, dim=1)
    hand = sum(-(0.3 * log_p[i, y[i]] + 0.7 * log_p[i, y2[i]]).item() for i in range(5)) / 5
    assert mixed_cross_entropy(logits, (y, y2, lam)).item() == pytest.approx(hand, rel=1e-5)


def test_masked_probs_give_zero_to_masked_classes():
    torch.manual_seed(2)
    logits = torch.randn(4, 6) * 5
    mask = torch.tensor([True, False, True, True, False, True])
    probs = masked_probs(logits, 2.0, mask)
    assert torch.all(probs[:, ~mask] == 0)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4))
    assert torch.allclose(probs[:, mask], torch.softmax(logits[:, mask] / 2.0, dim=1))
    assert torch.allclose(masked_probs(logits, 2.0, None), torch.softmax(logits / 2.0, dim=1))


# ------------------------------------------------------------- label store
def _images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N, 1, SIZE, SIZE), generator=generator, dtype=torch.uint8)


def _store(root, spec: AugmentSpec, topk: int = 0, epochs: int = 2, batch_size: int = 4, seed: int = 0):
    teacher = make_tiny_bn_net(num_classes=NUM_CLASSES)
    config = LabelStoreConfig(epochs=epochs, batch_size=batch_size, augment=spec, topk=topk, seed=seed)
    manifest = build_label_store(root, teacher, _images(), config, NORMALIZER, CPU, SIZE)
    return teacher, manifest


def _replayed_views(source: StoredLabels, bank: ImageBank, epoch: int, batch_size: int) -> dict[int, torch.Tensor]:
    """Per image, the view replayed when the stored order is cut into batches of `batch_size`."""
    views = {}
    order = source.epoch_order(epoch, len(bank), None)
    for x_uint8, _, idx in bank.batches(order, batch_size):
        out = source.replay_views(x_uint8.float() / 255, idx, epoch, bank)
        views.update({int(i): v for i, v in zip(idx, out)})
    return views


SPECS = {
    "none": AugmentSpec(crop="rrc", min_scale=0.25, flip=True, mix="none"),
    "cutmix": AugmentSpec(crop="rrc", min_scale=0.25, flip=True, mix="cutmix"),
    "pad-mixup": AugmentSpec(crop="pad", pad=2, flip=True, mix="mixup", mix_alpha=0.8),
}


@pytest.mark.parametrize("mix", list(SPECS))
def test_replay_reproduces_stored_logits(tmp_path, mix):
    spec = SPECS[mix]
    teacher, manifest = _store(tmp_path, spec)
    source = StoredLabels(tmp_path, spec, SIZE, T, True, NUM_CLASSES)
    bank = ImageBank(_images(), torch.arange(N) % NUM_CLASSES)
    orders = []
    for epoch in range(2):
        record = torch.load(epoch_file(tmp_path, epoch), map_location="cpu", weights_only=True)
        orders.append(record["order"].tolist())
        assert sorted(orders[-1]) == list(range(N))
        by3, by7 = _replayed_views(source, bank, epoch, 3), _replayed_views(source, bank, epoch, 7)
        assert sorted(by3) == sorted(by7) == list(range(N))
        for i in range(N):
            assert torch.equal(by3[i], by7[i]), f"image {i}: the view depends on the replay batch size"
        views = torch.stack([by3[i] for i in range(N)])
        with torch.no_grad():
            logits = teacher(NORMALIZER(views))
        stored = record["logits"].float()
        assert torch.allclose(logits, stored, rtol=2e-3, atol=2e-3), (logits - stored).abs().max()
        # The check can tell: the teacher's logits on the plain images are far from the stored ones.
        with torch.no_grad():
            plain = teacher(NORMALIZER(_images().float() / 255))
        assert (plain - stored).abs().max() > 0.05
        if mix != "none":
            partner = record["partner"]
            assert (partner >= 0).any() and (record["lam"] < 1).any()
            assert int(partner.max()) < N  # partners are image indices, not batch positions
        # The targets replayed are the stored logits at the temperature.
        idx = torch.tensor([3, 0, 7])
        assert torch.allclose(source.stored_probs(idx, epoch, CPU), torch.softmax(stored[idx] / T, dim=1))
    assert orders[0] != orders[1]  # a new permutation every epoch
    assert manifest["teacher_forwards"] == N * 2


def test_replay_uses_the_files_byte_exactly(tmp_path):
    spec = SPECS["cutmix"]
    _store(tmp_path, spec)
    source = StoredLabels(tmp_path, spec, SIZE, T, True, NUM_CLASSES)
    for epoch in range(2):
        on_disk = torch.load(epoch_file(tmp_path, epoch), map_location="cpu", weights_only=True)
        used = source._epoch(epoch)
        assert set(on_disk) == set(used) == {"order", "boxes", "flips", "partner", "lam", "mix_boxes", "logits"}
        for key in on_disk:
            assert on_disk[key].dtype == used[key].dtype and torch.equal(on_disk[key], used[key]), key
        assert on_disk["logits"].dtype == torch.float16 and on_disk["logits"].shape == (N, NUM_CLASSES)
    # A student trained longer than the store cycles through the stored epochs.
    assert torch.equal(source._epoch(2)["order"], on_disk_order(tmp_path, 0))
    with pytest.raises(ValueError, match="holds 10 images"):
        source.epoch_order(0, N + 1, None)


def on_disk_order(root, epoch):
    return torch.load(epoch_file(root, epoch), map_location="cpu", weights_only=True)["order"]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_store_is_byte_stable_and_not_rewritten(tmp_path):
    spec = SPECS["cutmix"]
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    _, first = _store(root_a, spec)
    _, other = _store(root_b, spec)
    files = [epoch_file(root_a, e) for e in range(2)]
    # Two builds give the same bytes, so the same hashes in labels.json.
    for e in range(2):
        assert epoch_file(root_a, e).read_bytes() == epoch_file(root_b, e).read_bytes()
    json_a, json_b = artifacts.read_json(root_a / "labels.json"), artifacts.read_json(root_b / "labels.json")
    assert json_a["files"] == json_b["files"] and json_a["label_hash"] == json_b["label_hash"]
    assert json_a["files"] == {f.name: _digest(f) for f in files}
    assert json_a["label_bytes"] == sum(f.stat().st_size for f in files) > 0
    assert first["label_hash"] == json_a["label_hash"]

    # Building a finished store again rewrites no epoch file.
    stamps = [f.stat().st_mtime_ns for f in files]
    _, again = _store(root_a, spec)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert {f.name: _digest(f) for f in files} == json_a["files"]
    assert (again["files"], again["label_hash"], again["label_bytes"]) == \
        (first["files"], first["label_hash"], first["label_bytes"])

    # An interrupted relabel resumes at the missing epoch and writes the same bytes.
    epoch_file(root_a, 1).unlink()
    _store(root_a, spec)
    assert _digest(epoch_file(root_a, 1)) == json_a["files"]["epoch_0001.pt"]
    assert epoch_file(root_a, 0).stat().st_mtime_ns == stamps[0]

    # Another seed gives another store.
    _, seeded = _store(tmp_path / "c", spec, seed=1)
    assert seeded["label_hash"] != first["label_hash"]


def test_a_store_grows_and_its_first_epochs_are_a_shorter_stores(tmp_path):
    """A store of 2 epochs extended to 4 is, byte for byte, the store built for 4 at once; asked
    for 2 again, it returns the 2-epoch store's manifest (same label hash), and a student of 2
    epochs replays epochs 0 and 1 of it, not all 4."""
    spec = SPECS["cutmix"]
    grown, direct, short = tmp_path / "grown", tmp_path / "direct", tmp_path / "short"
    _, two = _store(grown, spec, epochs=2)
    stamps = [epoch_file(grown, e).stat().st_mtime_ns for e in range(2)]
    _, four = _store(grown, spec, epochs=4)
    _, four_direct = _store(direct, spec, epochs=4)
    _, two_direct = _store(short, spec, epochs=2)
    assert [epoch_file(grown, e).stat().st_mtime_ns for e in range(2)] == stamps   # extended, not remade
    for e in range(4):
        assert epoch_file(grown, e).read_bytes() == epoch_file(direct, e).read_bytes()
    assert (four["files"], four["label_hash"], four["label_bytes"]) == \
        (four_direct["files"], four_direct["label_hash"], four_direct["label_bytes"])
    assert four["teacher_forwards"] == N * 4 and two["teacher_forwards"] == N * 2
    _, two_again = _store(grown, spec, epochs=2)
    assert (two_again["files"], two_again["label_hash"]) == (two_direct["files"], two_direct["label_hash"]) \
        == (two["files"], two["label_hash"])
    assert two_again["label_hash"] != four["label_hash"]
    listed = artifacts.read_json(grown / "labels.json")
    assert listed["config"]["epochs"] == 4 and listed["files"] == four["files"]
    assert listed["label_hash"] == four["label_hash"]

    replay_two = StoredLabels(grown, spec, SIZE, T, True, NUM_CLASSES, epochs=2)
    replay_all = StoredLabels(grown, spec, SIZE, T, True, NUM_CLASSES)
    assert replay_all.epochs == 4
    for epoch in range(4):   # a 2-epoch student cycles through epochs 0 and 1, as its own store would make it
        assert replay_two.epoch_order(epoch, N, None).tolist() == replay_all.epoch_order(epoch % 2, N, None).tolist()
    assert replay_all.epoch_order(2, N, None).tolist() != replay_all.epoch_order(0, N, None).tolist()


def test_topk_store_keeps_k_values(tmp_path):
    spec = SPECS["none"]
    _, full = _store(tmp_path / "full", spec)
    _, top2 = _store(tmp_path / "top2", spec, topk=2)
    full_logits = torch.load(epoch_file(tmp_path / "full", 0), weights_only=True)["logits"].float()
    record = torch.load(epoch_file(tmp_path / "top2", 0), weights_only=True)
    assert "logits" not in record
    assert record["topk_values"].shape == (N, 2) and record["topk_indices"].shape == (N, 2)
    assert record["topk_values"].dtype == torch.float16
    # Same seed, same views: the kept entries are the two largest of the full logits.
    assert torch.equal(record["topk_indices"].long(), full_logits.topk(2, dim=1).indices)
    assert torch.allclose(record["topk_values"].float(), full_logits.topk(2, dim=1).values)

    source = StoredLabels(tmp_path / "top2", spec, SIZE, T, True, NUM_CLASSES)
    idx = torch.arange(N)
    probs = source.stored_probs(idx, 0, CPU)
    assert probs.shape == (N, NUM_CLASSES)
    kept = torch.zeros(N, NUM_CLASSES, dtype=torch.bool)
    kept.scatter_(1, record["topk_indices"].long(), True)
    assert torch.all(probs[~kept] == 0)
    assert torch.allclose(probs.sum(dim=1), torch.ones(N))
    expected = torch.softmax(record["topk_values"].float() / T, dim=1)
    assert torch.allclose(probs.gather(1, record["topk_indices"].long()), expected)
    for manifest, root in ((full, tmp_path / "full"), (top2, tmp_path / "top2")):
        assert manifest["label_bytes"] == sum(epoch_file(root, e).stat().st_size for e in range(2))


def test_label_store_size_is_computed_printed_and_refused_when_too_large(tmp_path):
    from cdabench.data import DataError
    from cdabench.engine.labels import check_label_store_size, label_store_bytes
    # ImageNet-21K at IPC 10, 300 epochs: all fp16 logits vs the top 100 (fp16 value + int32 index).
    assert label_store_bytes(104_500, 10_450, 300) == 104_500 * (10_450 * 2 + 29) * 300
    assert label_store_bytes(104_500, 10_450, 300, topk=100) == 104_500 * (100 * 6 + 29) * 300
    config = LabelStoreConfig(epochs=300, batch_size=128, augment=AugmentSpec(), topk=0)
    with pytest.raises(DataError, match=r"label store needs .* GiB .* topk = 100"):
        check_label_store_size(tmp_path, 10**9, 10_450, config, 300)
    check_label_store_size(tmp_path, 20, 10, config, 2)  # small: printed, accepted
