"""Tests for cdabench.data: every official layout, splits, fingerprints and errors."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch

from cdabench.data import (
    DATASETS,
    DataError,
    ImageSplit,
    create_dataset,
    list_datasets,
    load_imagefolder,
    stratified_holdout,
)

from tests.fixtures import (
    CIFAR10_NAMES, MARKER_GRAY, MARKER_RGB, REPO, cifar100_names, class_colour, class_gray,
    make_cifar10, make_cifar100, make_imagefolder, make_mnist, make_tiny_imagenet,
    tiny_wnids, write_image,
)

JPEG_TOLERANCE = 4  # grey levels; class colours are 40 apart


def assert_colour(image: torch.Tensor, colour, atol: float = JPEG_TOLERANCE) -> None:
    """The mean colour of a (C, H, W) uint8 image matches `colour`."""
    mean = image.float().mean(dim=(1, 2))
    assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float32), atol=atol), (mean, colour)


def assert_split_labels_rgb(split: ImageSplit, with_marker: bool = False) -> None:
    """Every item's pixels carry class_colour(its label)."""
    for i in range(len(split)):
        image, label = split[i]
        assert image.dtype == torch.uint8
        assert isinstance(label, int) and label == split.targets[i]
        if with_marker:
            assert tuple(image[:, 0, 1].tolist()) == MARKER_RGB
            assert tuple(image[:, 1, 0].tolist()) == class_colour(label)
        else:
            assert_colour(image, class_colour(label))


# ------------------------------------------------------------------ registry
def test_registry_lists_every_dataset():
    assert list_datasets() == [
        "digits", "cifar10", "cifar100", "mnist", "fashion-mnist",
        "tiny-imagenet", "imagenet-1k", "imagenet-21k", "imagefolder",
    ]
    for spec in DATASETS.values():
        assert len(spec.mean) == len(spec.std) == spec.channels
        assert spec.layout
    assert DATASETS["imagenet-21k"].mean == (0.0, 0.0, 0.0)
    assert not DATASETS["imagenet-1k"].fixed_size and DATASETS["tiny-imagenet"].fixed_size


# -------------------------------------------------------------------- digits
def test_digits_default_split():
    from sklearn.datasets import load_digits

    data = create_dataset("digits")
    assert (len(data.train), len(data.test)) == (1437, 360)
    assert data.classes == [str(d) for d in range(10)]
    assert data.image_size == 8 and data.train.channels == 1
    image, label = data.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8
    # Stratified: every class appears in both splits in ~80/20 proportion.
    assert np.all(np.bincount(data.test.targets, minlength=10) >= 34)
    # The label mapping is right: every (image, label) pair is one of sklearn's.
    digits = load_digits()
    reference = {
        (np.rint(img * 255 / 16).astype(np.uint8).tobytes(), int(t))
        for img, t in zip(digits.images, digits.target)
    }
    everything = torch.cat([data.train.load_all(), data.test.load_all()])
    labels = np.concatenate([data.train.targets, data.test.targets])
    assert all((img[0].numpy().tobytes(), int(t)) in reference for img, t in zip(everything, labels))


def test_digits_upsampled_once_at_load():
    data = create_dataset("digits", image_size=16)
    assert data.image_size == 16
    image, _ = data.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.uint8
    # Bilinear upsampling keeps the image's overall brightness.
    small = create_dataset("digits").train[0][0].float().mean()
    assert abs(image.float().mean() - small) < 8


# --------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_layout(tmp_path, point_at_folder):
    root = make_cifar10(tmp_path, per_class=3)
    if point_at_folder:
        root = root / "cifar-10-batches-py"
    data = create_dataset("cifar10", root)
    assert (len(data.train), len(data.test)) == (30, 10)
    assert data.classes == CIFAR10_NAMES
    assert data.train.targets.dtype == np.int64
    assert data.train[0][0].shape == (3, 32, 32)
    assert_split_labels_rgb(data.train, with_marker=True)
    assert_split_labels_rgb(data.test, with_marker=True)
    assert data.train.load_all().shape == (30, 3, 32, 32)


def test_cifar100_layout_and_resize(tmp_path):
    root = make_cifar100(tmp_path, per_class=2)
    data = create_dataset("cifar100", root)
    assert (len(data.train), len(data.test)) == (200, 100)
    assert data.classes == cifar100_names()
    assert_split_labels_rgb(data.train, with_marker=True)

    small = create_dataset("cifar100", root, image_size=16)
    assert small.image_size == 16
    image, label = small.test[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    # Away from the marker corner the class colour survives resizing.
    assert tuple(image[:, 8, 8].tolist()) == class_colour(label)


# --------------------------------------------------------------------- MNIST
@pytest.mark.parametrize(
    "gz, subdir", [(True, None), (False, ""), (True, "raw")], ids=["torchvision-gz", "flat", "raw"]
)
def test_mnist_layouts(tmp_path, gz, subdir):
    root = make_mnist(tmp_path, n_train=30, n_test=10, gz=gz, subdir=subdir)
    data = create_dataset("mnist", root)
    assert (len(data.train), len(data.test)) == (30, 10)
    assert data.classes == [str(d) for d in range(10)]
    for split in (data.train, data.test):
        for i in range(len(split)):
            image, label = split[i]
            assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
            assert label == i % 10
            assert image[0, 0, 1] == MARKER_GRAY and image[0, 1, 0] == class_gray(label)


def test_fashion_mnist_layout(tmp_path):
    root = make_mnist(tmp_path, n_train=20, n_test=10, name="fashion-mnist")
    data = create_dataset("fashion-mnist", root)
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert len(data.train) == 20 and data.train[3][1] == 3
    assert data.spec.mean == (0.2860,)


# -------------------------------------------------------------- Tiny ImageNet
def tiny_colour(classes: list[str], label: int) -> tuple[int, int, int]:
    """The fixture's colour of class `label`: class_colour of its wnid's line in wnids.txt."""
    return class_colour(tiny_wnids().index(classes[label]))


def test_tiny_imagenet_layout(tmp_path):
    root = make_tiny_imagenet(tmp_path, per_class=2, val_per_class=1)
    data = create_dataset("tiny-imagenet", root)
    assert data.classes == sorted(tiny_wnids())  # sorted wnids, not wnids.txt's line order
    assert (len(data.train), len(data.test)) == (400, 200)
    assert np.array_equal(np.bincount(data.train.targets), np.full(200, 2))
    assert data.test.paths == sorted(data.test.paths)  # sorted file order
    for split in (data.train, data.test):
        for i in (0, 1, len(split) // 2, len(split) - 1):
            image, label = split[i]
            assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
            assert_colour(image, tiny_colour(data.classes, label))

    # Pointing --data-root at the folder itself works, and another size resizes.
    small = create_dataset("tiny-imagenet", root / "tiny-imagenet-200", image_size=32)
    image, label = small.test[7]
    assert small.image_size == 32 and image.shape == (3, 32, 32)
    assert_colour(image, tiny_colour(small.classes, label))


def test_tiny_imagenet_classes_are_sorted_wnids_not_file_order(tmp_path):
    # The real archive's wnids.txt is not sorted; the field (torchvision ImageFolder over train/,
    # the official Tiny training code, SRe2L/CDA, RDED) numbers classes in sorted wnid order.
    root = make_tiny_imagenet(tmp_path, per_class=1, val_per_class=1)
    listed = (root / "tiny-imagenet-200" / "wnids.txt").read_text().split()
    assert listed != sorted(listed)  # the fixture's file is shuffled
    data = create_dataset("tiny-imagenet", root)
    expected = {wnid: k for k, wnid in enumerate(sorted(listed))}
    # Every train image's label is its folder's (train/<wnid>/images/x.JPEG) sorted index ...
    assert [expected[p.parent.parent.name] for p in data.train.paths] == list(data.train.targets)
    # ... and every val image's label the sorted index of its wnid in val_annotations.txt.
    annotated = dict(line.split("\t")[:2] for line in
                     (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines())
    assert [expected[annotated[p.name]] for p in data.test.paths] == list(data.test.targets)


def test_tiny_imagenet_unknown_wnid_in_annotations(tmp_path):
    root = make_tiny_imagenet(tmp_path, per_class=1, val_per_class=1)
    annotations = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n99999999"):
        create_dataset("tiny-imagenet", root)


# ------------------------------------------------------------- ImageFolder
def test_imagenet1k_layout(tmp_path):
    root = make_imagefolder(tmp_path, classes=("n02", "n01", "n03"), per_class=3, size=(40, 30))
    data = create_dataset("imagenet-1k", root)
    assert data.classes == ["n01", "n02", "n03"]  # sorted train folder names
    assert (len(data.train), len(data.test)) == (9, 9)
    assert data.image_size == 224 and not data.spec.fixed_size
    written_order = ["n02", "n01", "n03"]  # fixture colour index
    for split in (data.train, data.test):
        for i in range(len(split)):
            image, label = split[i]
            assert image.shape == (3, 30, 40)  # native size; the evaluator resizes
            assert_colour(image, class_colour(written_order.index(data.classes[label])))


def test_imagefolder_and_21k_share_the_layout(tmp_path):
    root = make_imagefolder(tmp_path, classes=("cat", "dog"), per_class=2)
    data = create_dataset("imagefolder", root, image_size=64)
    assert data.image_size == 64 and data.classes == ["cat", "dog"]
    assert data.train.load_all().shape == (4, 3, 30, 40)
    big = create_dataset("imagenet-21k", root)
    assert big.classes == ["cat", "dog"] and len(big.test) == 4


def test_imagenet_flat_val_mentions_valprep(tmp_path):
    root = make_imagefolder(tmp_path, classes=("n01", "n02"), per_class=1)
    shutil.rmtree(root / "val")
    write_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", (1, 2, 3), (8, 8))
    with pytest.raises(DataError, match="valprep"):
        create_dataset("imagenet-1k", root)


def test_imagenet_val_classes_must_match_train(tmp_path):
    root = make_imagefolder(tmp_path, classes=("n01", "n02"), per_class=1)
    (root / "val" / "n02").rename(root / "val" / "n09")
    with pytest.raises(DataError, match="n09"):
        create_dataset("imagenet-1k", root)


def test_load_imagefolder_by_name_uses_given_order(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=2)
    split, classes = load_imagefolder(tmp_path / "train", 3, classes=["c", "a", "b"])
    assert classes == ["c", "a", "b"]
    for i in range(len(split)):
        image, label = split[i]
        assert_colour(image, class_colour("abc".index(classes[label])))


def test_load_imagefolder_by_trailing_integer(tmp_path):
    # Official SRe2L / CDA releases name folders by class index.
    for index in range(3):
        write_image(tmp_path / f"new{index:03d}" / "0.png", class_colour(index), (8, 8))
    split, classes = load_imagefolder(tmp_path, 3, classes=["x", "y", "z"])
    assert classes == ["x", "y", "z"]
    assert list(split.targets) == [0, 1, 2]
    for i in range(3):
        assert_colour(split[i][0], class_colour(split[i][1]), atol=0)


def test_load_imagefolder_grayscale_and_sorted_default(tmp_path):
    make_imagefolder(tmp_path, classes=("b", "a"), per_class=1, size=(5, 7))
    split, classes = load_imagefolder(tmp_path / "train", channels=1)
    assert classes == ["a", "b"]
    assert split[0][0].shape == (1, 7, 5)


def test_load_imagefolder_refuses_mismatch(tmp_path):
    for name in ("new000", "new001", "other"):
        write_image(tmp_path / name / "0.png", (0, 0, 0), (4, 4))
    with pytest.raises(DataError, match=r"3 class folders.*4 expected.*other"):
        load_imagefolder(tmp_path, 3, classes=["w", "x", "y", "z"])
    # Trailing integers that are not exactly 0..K-1 are refused too.
    (tmp_path / "other").rename(tmp_path / "new005")
    with pytest.raises(DataError, match="new005"):
        load_imagefolder(tmp_path, 3, classes=["x", "y", "z"])


# -------------------------------------------------------------- fingerprint
def test_fingerprint_stable_and_sensitive(tmp_path):
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    first = create_dataset("imagefolder", root).fingerprint()
    assert first == create_dataset("imagefolder", root).fingerprint()
    assert first != create_dataset("imagefolder", root, image_size=112).fingerprint()
    # Re-encode one file at another size: its byte size changes.
    write_image(root / "val" / "b" / "b_0.png", class_colour(1), (80, 60))
    assert create_dataset("imagefolder", root).fingerprint() != first


def test_fingerprint_does_not_depend_on_root_location(tmp_path):
    make_imagefolder(tmp_path / "one", classes=("a", "b"), per_class=1)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert (
        create_dataset("imagefolder", tmp_path / "one").fingerprint()
        == create_dataset("imagefolder", tmp_path / "two").fingerprint()
    )


def test_fingerprint_of_arrays(tmp_path):
    root = make_cifar10(tmp_path, per_class=1)
    first = create_dataset("cifar10", root).fingerprint()
    assert first == create_dataset("cifar10", root).fingerprint()
    assert len(first) == 64 and int(first, 16) >= 0
    assert create_dataset("digits").fingerprint() != create_dataset("digits", image_size=16).fingerprint()


# ------------------------------------------------------------------ splits
def test_stratified_holdout_per_class():
    targets = np.repeat(np.arange(4), 10)
    fit, held = stratified_holdout(targets, per_class=3, seed=1)
    assert np.array_equal(np.bincount(targets[held]), [3, 3, 3, 3])
    assert np.array_equal(np.bincount(targets[fit]), [7, 7, 7, 7])
    assert not set(fit) & set(held) and len(fit) + len(held) == len(targets)
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(held) > 0)
    again = stratified_holdout(targets, per_class=3, seed=1)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(stratified_holdout(targets, per_class=3, seed=2)[1], held)


def test_stratified_holdout_fraction_rounds_and_clamps():
    targets = np.array([0] * 10 + [1] * 3 + [2] * 2)
    fit, held = stratified_holdout(targets, fraction=0.25, seed=0)
    # round(2.5)=2, round(0.75)=1, round(0.5)=0 -> clamped to 1
    assert np.array_equal(np.bincount(targets[held], minlength=3), [2, 1, 1])
    fit, held = stratified_holdout(targets, fraction=0.99, seed=0)
    assert np.array_equal(np.bincount(targets[fit], minlength=3), [1, 1, 1])  # at most n_c - 1


def test_stratified_holdout_ignores_global_rng():
    targets = np.repeat(np.arange(3), 6)
    np.random.seed(123)
    a = stratified_holdout(targets, per_class=2, seed=5)
    np.random.seed(456)
    b = stratified_holdout(targets, per_class=2, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_stratified_holdout_rejects_bad_requests():
    targets = np.array([0, 0, 0, 1])
    with pytest.raises(DataError, match="class 1"):
        stratified_holdout(targets, per_class=1)
    with pytest.raises(DataError, match="exactly one"):
        stratified_holdout(targets, per_class=1, fraction=0.5)
    with pytest.raises(DataError, match="exactly one"):
        stratified_holdout(targets)


# --------------------------------------------------------------- ImageSplit
def test_image_split_from_array_subset_transform():
    images = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)  # (N, H, W)
    original = images.copy()  # from_array wraps `images` without copying
    split = ImageSplit.from_array(images, [0, 1, 0, 1])
    assert split.channels == 1 and len(split) == 4
    assert torch.equal(split[2][0], torch.from_numpy(images[2])[None])

    flipped = split.with_transform(lambda img: img.flip(-1))
    assert split.transform is None  # the original is untouched
    part = flipped.subset([3, 1])
    assert list(part.targets) == [1, 1] and part.transform is flipped.transform
    assert torch.equal(part[0][0], torch.from_numpy(images[3][:, ::-1].copy())[None])
    assert part.load_all().shape == (2, 1, 3, 2)

    # In-place edits of a returned item or of load_all never reach the stored data.
    split[1][0].zero_()
    split.load_all().zero_()
    assert torch.equal(split[1][0], torch.from_numpy(original[1])[None])
    assert np.array_equal(images, original)


def test_image_split_rejects_bad_input():
    with pytest.raises(DataError, match="uint8"):
        ImageSplit.from_array(np.zeros((2, 4, 4), dtype=np.float32), [0, 1])
    with pytest.raises(DataError, match="targets"):
        ImageSplit.from_array(np.zeros((2, 4, 4), dtype=np.uint8), [0])


def test_load_all_requires_equal_sizes(tmp_path):
    paths = [write_image(tmp_path / "a.png", (1, 2, 3), (4, 4)), write_image(tmp_path / "b.png", (1, 2, 3), (5, 4))]
    split = ImageSplit.from_files(paths, [0, 0], channels=3)
    with pytest.raises(DataError, match="one size"):
        split.load_all()
    resized = split.with_transform(lambda img: img[:, :, :4])
    assert resized.load_all().shape == (2, 3, 4, 4)


# ------------------------------------------------------------------- errors
def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as info:
        create_dataset("cifar11")
    for name in list_datasets():
        assert name in str(info.value)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"--data-root is required.*cifar-10-batches-py"):
        create_dataset("cifar10")
    with pytest.raises(DataError, match=r"does not exist.*tiny-imagenet-200"):
        create_dataset("tiny-imagenet", tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("mnist", "train-images-idx3-ubyte"),
        ("tiny-imagenet", "wnids.txt"),
        ("imagenet-1k", "train"),
    ],
)
def test_wrong_layout_names_expected_layout(tmp_path, name, expected):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DataError) as info:
        create_dataset(name, tmp_path)
    message = str(info.value)
    assert expected in message and "Expected layout" in message and str(tmp_path) in message


def test_missing_cifar_batch_is_named(tmp_path):
    root = make_cifar10(tmp_path, per_class=1)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        create_dataset("cifar10", root)


def test_corrupt_image_names_the_file_on_access(tmp_path):
    root = make_tiny_imagenet(tmp_path, per_class=1, val_per_class=1)
    bad = root / "tiny-imagenet-200" / "train" / tiny_wnids()[0] / "images" / f"{tiny_wnids()[0]}_0.JPEG"
    bad.write_bytes(b"this is not a jpeg at all")
    data = create_dataset("tiny-imagenet", root)  # decoding is lazy: loading succeeds
    with pytest.raises(DataError) as info:
        data.train[0]
    assert str(bad) in str(info.value) and "remove or replace" in str(info.value)
    assert data.train[1][0].shape == (3, 64, 64)  # other files are unaffected


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file(tmp_path, gz):
    root = make_mnist(tmp_path, gz=gz, subdir="")
    path = root / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    # A cut-off download: for .gz the compressed stream itself ends early.
    path.write_bytes(path.read_bytes()[: -20 if gz else -100])
    with pytest.raises(DataError, match=r"truncated.*re-download"):
        create_dataset("mnist", root)


def test_idx_count_mismatch(tmp_path):
    root = make_mnist(tmp_path, n_train=30, gz=False, subdir="")
    labels = root / "train-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 2049, 29) + bytes(29))
    with pytest.raises(DataError, match="30 images but .* 29 labels"):
        create_dataset("mnist", root)


def test_empty_class_folder(tmp_path):
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=1)
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"train[/\\]c contains no images"):
        create_dataset("imagefolder", root)


def test_root_without_class_folders(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        load_imagefolder(tmp_path, 3)


# ------------------------------------------------ class order of released sets
def test_released_new_folders_map_onto_sorted_wnids(tmp_path):
    """An official SRe2L/CDA release (folders new000 ... new199) numbers folder k as class k of
    the sorted wnids; evaluate --data must pair each folder with those real images."""
    from cdabench.config import load_task, with_holdout
    from cdabench.distill.sets import load_distilled
    from cdabench.engine.context import open_context

    make_tiny_imagenet(tmp_path / "data", per_class=2, val_per_class=1)
    task_file = tmp_path / "tiny8.toml"
    task_file.write_text('dataset = "tiny-imagenet"\nimage_size = 8\nholdout_per_class = 1\n')
    ctx = open_context(load_task(str(task_file)), str(tmp_path / "data"), "cpu", tmp_path / "cache")
    released = tmp_path / "released"
    for k, wnid in enumerate(sorted(tiny_wnids())):  # what the release's folder k depicts
        write_image(released / f"new{k:03d}" / "class_image.png", class_colour(tiny_wnids().index(wnid)), (8, 8))
    bank, manifest = load_distilled(ctx, released)
    assert manifest["method"] == "external" and list(bank.labels) == list(range(200))
    test = ctx.source("test")
    for k in range(200):
        real = test.images[test.labels == k]
        assert len(real) == 1  # one val image per class in the fixture
        # The released image of class k has the colour of the real test images of class k.
        assert torch.allclose(bank.images[k].float().mean((1, 2)), real[0].float().mean((1, 2)), atol=JPEG_TOLERANCE)
    assert with_holdout(ctx.task) is ctx.task


# ------------------------------------------------------- normalisation table
DATASET_TABLE_HEADING = "## Datasets: class order and normalisation"


def _read_dataset_table() -> dict[str, dict]:
    """The rows of the table under DATASET_TABLE_HEADING in docs/methods.md, by dataset name."""

    text = (REPO / "docs" / "methods.md").read_text()
    assert DATASET_TABLE_HEADING in text, f"docs/methods.md lacks the section {DATASET_TABLE_HEADING!r}"
    section = text.split(DATASET_TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[2:]:  # rows[1] is the |---| separator
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        table[cells["dataset"].strip("`")] = cells
    return table


def _numbers(cell: str) -> tuple[float, ...]:
    return tuple(float(x) for x in cell.strip("()").split(","))


def test_docs_dataset_table_matches_the_registry():
    table = _read_dataset_table()
    assert sorted(table) == sorted(DATASETS)
    for name, spec in DATASETS.items():
        row = table[name]
        assert _numbers(row["mean"]) == spec.mean, name
        assert _numbers(row["std"]) == spec.std, name
        assert int(row["working size"].split()[0]) == spec.image_size, name
        assert row["class order"], name


def test_cifar_normalisation_is_the_official_scripts():
    # SRe2L's squeeze/recover/relabel CIFAR scripts (and the kuangliu/pytorch-cifar CIFAR-10
    # recipe they adapt) normalise with these constants; recover's start noise, clamp box and
    # step size are in that space.
    for name in ("cifar10", "cifar100"):
        assert DATASETS[name].mean == (0.4914, 0.4822, 0.4465)
        assert DATASETS[name].std == (0.2023, 0.1994, 0.2010)
    assert DATASETS["tiny-imagenet"].mean == (0.4802, 0.4481, 0.3975)
    assert DATASETS["tiny-imagenet"].std == (0.2302, 0.2265, 0.2262)


# ------------------------------------------------ reading data never runs code
def test_cifar_fixture_is_in_the_official_pickle_format(tmp_path):
    """The fixture's files are what the official (Python 2 cPickle) files hold: protocol 2,
    strings as Python 2 str, arrays by numpy.core.multiarray._reconstruct; no other global."""
    import pickletools

    root = make_cifar10(tmp_path, per_class=1)
    raw = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    ops = list(pickletools.genops(raw))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 2
    globals_named = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert globals_named == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert not any(op.name in ("BINUNICODE", "SHORT_BINUNICODE", "BINBYTES") for op, _, _ in ops)


class _Payload:
    """Unpickling this calls `call(*args)`: how a crafted pickle runs code."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("file_name", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("how", ["os.system", "open"])
def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path, file_name, how):
    import os
    import pickle

    root = make_cifar10(tmp_path / "data", per_class=1)
    marker = tmp_path / "pwned"
    payload = _Payload(os.system, f"touch {marker}") if how == "os.system" else _Payload(open, str(marker), "w")
    path = root / "cifar-10-batches-py" / file_name
    with open(path, "wb") as f:
        pickle.dump({"data": payload, "labels": [0], "label_names": payload}, f, protocol=2)
    with pytest.raises(DataError) as info:
        create_dataset("cifar10", root)
    message = " ".join(str(info.value).split())
    assert str(path) in message and "refused" in message and "re-extract the official archive" in message
    assert ("system" if how == "os.system" else "open") in message
    assert not marker.exists()  # the call never ran


# ------------------------------------------------ held-out size from the command line
def test_holdout_shortage_names_the_command_line_options():
    with pytest.raises(DataError) as info:
        stratified_holdout(np.array([0, 0, 0, 1, 1]), per_class=2)
    message = str(info.value)
    assert "class 1 has only 2 images" in message
    assert "--holdout-per-class" in message and "--holdout-fraction" in message


