"""The copies people keep, read as a --data-root of the existing tasks: a parquet copy in the real
Tiny-ImageNet column layout and a WebDataset copy load with the sorted wnid order and the folder
fixture's very pixels; a permuted ClassLabel is refused with the mapping found; a copy without
names is taken as ordered and says so; ImageNet's lemma names are matched to its wnids; a CIFAR-10
save_to_disk folder gives the official layout's pixels; the prepared cache and the fingerprint
work on a copy as on folders; pyarrow missing is a clear error naming the extra."""
from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cdabench.config import load_task, with_holdout
from cdabench.data import DataError, create_dataset
from cdabench.data.copies import detect
from cdabench.engine.context import open_context
from tests.fixtures import (CIFAR10_NAMES, class_colour, hf_table, make_cifar10, make_cifar10_save_to_disk,
                            make_tiny_imagenet, make_tiny_imagenet_parquet, make_tiny_imagenet_webdataset,
                            tiny_wnids)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The official-layout fixture (200 wnids, 2 train + 1 val image each): the copies' source."""
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny-folder"), per_class=2, val_per_class=1)


def same_images_as_the_folder(copy, folder) -> None:
    """Equal class lists, targets and decoded pixels, split by split."""
    assert copy.classes == folder.classes == sorted(tiny_wnids())
    for mine, theirs in ((copy.train, folder.train), (copy.test, folder.test)):
        assert list(mine.targets) == list(theirs.targets)
        assert torch.equal(mine.load_all(), theirs.load_all())


def test_parquet_copy_in_the_tiny_imagenet_layout_loads_in_sorted_wnid_order(tiny_folder, tmp_path):
    root = make_tiny_imagenet_parquet(tmp_path / "hf", tiny_folder)
    assert detect(root) == "parquet"
    table = pq.read_table(next((root / "data").glob("train-*.parquet")))
    assert table.column_names == ["image", "label"] and table.schema.field("image").type.get_field_index("bytes") == 0
    copy = create_dataset("tiny-imagenet", root)
    same_images_as_the_folder(copy, create_dataset("tiny-imagenet", tiny_folder))
    # The pixels carry the class: label i's images have the colour of wnid classes[i] (fixtures.class_colour).
    image, label = copy.train[123]
    assert tuple(image[:, 32, 32].tolist()) == pytest.approx(class_colour(tiny_wnids().index(copy.classes[label])), abs=3)


def test_webdataset_copy_loads_in_sorted_wnid_order_and_keeps_its_index(tiny_folder, tmp_path):
    root = make_tiny_imagenet_webdataset(tmp_path / "wds", tiny_folder)
    assert detect(root) == "webdataset"
    cache = tmp_path / "cache"
    copy = create_dataset("tiny-imagenet", root, cache=cache)
    same_images_as_the_folder(copy, create_dataset("tiny-imagenet", tiny_folder))
    indexes = sorted((cache / "copy-index").iterdir())
    assert len(indexes) == len(list(root.glob("*.tar"))) == 5   # 400 train + 200 val images in shards of 150
    stamps = [p.stat().st_mtime_ns for p in indexes]
    again = create_dataset("tiny-imagenet", root, cache=cache)          # read from the kept index
    assert [p.stat().st_mtime_ns for p in sorted((cache / "copy-index").iterdir())] == stamps
    assert list(again.train.targets) == list(copy.train.targets)


def test_a_permuted_classlabel_is_refused_with_the_mapping(tiny_folder, tmp_path):
    """Labels numbered in wnids.txt's line order (the archive's, not the field's sorted order)."""
    root = make_tiny_imagenet_parquet(tmp_path / "hf", tiny_folder, names=tiny_wnids())
    with pytest.raises(DataError) as err:
        create_dataset("tiny-imagenet", root)
    text = str(err.value)
    assert "ClassLabel names are not in the task's class order (the sorted class names: Tiny-ImageNet's sorted wnids)" in text
    # tiny_wnids()[1] is n00000007: the 8th wnid in sorted order.
    assert "label 1 is 'n00000007', class 7 in the task's order" in text and "align_labels_with_mapping" in text


def test_a_copy_without_class_names_is_taken_as_ordered_and_says_so(tiny_folder, tmp_path, capsys):
    root = make_tiny_imagenet_parquet(tmp_path / "hf", tiny_folder, with_names=False)
    copy = create_dataset("tiny-imagenet", root)
    assert copy.classes == [str(i) for i in range(200)]
    assert "carries no class names" in " ".join(capsys.readouterr().err.split())


def test_unlabelled_test_split_is_refused(tmp_path):
    for split, label in (("train", 0), ("test", -1)):    # ImageNet's Hub test split has label -1
        path = tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(hf_table([b"x"], ["a.png"], [label], CIFAR10_NAMES, image_column="img"), path)
    with pytest.raises(DataError, match="unlabelled images"):
        create_dataset("cifar10", tmp_path / "hf")


def test_imagenet_lemma_names_map_to_the_standard_wnid_order(tmp_path):
    from timm.data import ImageNetInfo
    info = ImageNetInfo("imagenet-1k")
    lemmas = list(info.label_descriptions())
    for variant, names in (("ok", lemmas), ("swapped", [lemmas[1], lemmas[0], *lemmas[2:]])):
        for split in ("train", "validation"):
            path = tmp_path / variant / "data" / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(hf_table([b"x"] * 1000, [f"{i}.JPEG" for i in range(1000)], list(range(1000)), names), path)
    assert create_dataset("imagenet-1k", tmp_path / "ok").classes == list(info.label_names())
    with pytest.raises(DataError, match="label 0 is 'goldfish, Carassius auratus', class 1 in the task's order"):
        create_dataset("imagenet-1k", tmp_path / "swapped")


def test_cifar10_save_to_disk_gives_the_official_pixels(tmp_path):
    copy = create_dataset("cifar10", make_cifar10_save_to_disk(tmp_path / "hf"))
    official = create_dataset("cifar10", make_cifar10(tmp_path / "official"))
    assert copy.classes == official.classes == CIFAR10_NAMES
    for mine, theirs in ((copy.train, official.train), (copy.test, official.test)):
        assert list(mine.targets) == list(theirs.targets)
        assert torch.equal(mine.load_all(), theirs.load_all())


def test_prepared_cache_and_fingerprint_work_on_a_copy(tiny_folder, tmp_path):
    root = make_tiny_imagenet_parquet(tmp_path / "hf", tiny_folder)
    task = with_holdout(load_task("tiny-imagenet"), per_class=1)
    ctx = open_context(task, str(root), "cpu", tmp_path / "cache")
    reference = open_context(task, str(tiny_folder), "cpu", tmp_path / "cache")
    test = ctx.source("test")
    assert torch.equal(test.images, reference.source("test").images)
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 2     # one view per source
    fingerprint = ctx.data.fingerprint()
    assert fingerprint != reference.data.fingerprint()
    assert open_context(task, str(root), "cpu", tmp_path / "cache").data.fingerprint() == fingerprint
    # The same images in other row groups: other shard bytes, another fingerprint and prepared view.
    valid = next((root / "data").glob("valid-*.parquet"))
    pq.write_table(pq.read_table(valid), valid, row_group_size=7)
    changed = open_context(task, str(root), "cpu", tmp_path / "cache")
    assert changed.data.fingerprint() != fingerprint
    assert torch.equal(changed.source("test").images, test.images)      # read across 7-row groups
    assert np.array_equal(changed.source("test").labels.numpy(), test.labels.numpy())


def test_missing_pyarrow_names_the_extra(tiny_folder, tmp_path, monkeypatch):
    root = make_tiny_imagenet_parquet(tmp_path / "hf", tiny_folder)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"needs pyarrow.*pip install 'cdabench\[hf\]'"):
        create_dataset("tiny-imagenet", root)


def test_the_official_archive_beside_the_folders_is_no_webdataset_copy(tmp_path):
    """ILSVRC2012_img_train.tar kept beside the extracted train/ and val/ folders is not a shard."""
    from tests.fixtures import make_imagefolder
    root = make_imagefolder(tmp_path / "imagenet", classes=("n01440764", "n01443537"), per_class=1)
    (root / "ILSVRC2012_img_train.tar").write_bytes(b"")
    assert detect(root) is None
    assert create_dataset("imagenet-1k", root).classes == ["n01440764", "n01443537"]


def test_a_copy_is_decoded_in_parallel_worker_processes(tiny_folder, tmp_path):
    """The prepared cache's worker processes get a copy's shards by pickle (no open file or row
    group travels) and read them themselves: the same pixels as one process."""
    from cdabench.data.prepared import build_prepared, open_prepared, split_fingerprint
    test = create_dataset("tiny-imagenet", make_tiny_imagenet_parquet(tmp_path / "hf", tiny_folder, row_group_size=30)).test
    assert test.load_all() is not None   # this process reads a row group first: its cache must not be sent
    fingerprint = split_fingerprint(test, "view")
    build_prepared(test, tmp_path / "prepared", fingerprint, (3, 64, 64), workers=2, chunk=64)
    images, targets = open_prepared(tmp_path / "prepared", fingerprint)
    assert torch.equal(images, test.load_all()) and targets.tolist() == list(test.targets)
