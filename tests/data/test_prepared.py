"""The prepared cache: the working-size view of an ImageFolder decoded once into a memory-mapped
uint8 array; it round-trips exactly, is rebuilt when a file changes, and Context.source serves it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdabench.data import DataError
from cdabench.data.images import load_imagefolder
from cdabench.data.prepared import build_prepared, open_prepared, prepared_split, split_fingerprint
from cdabench.data.resources import check_free_space
from tests.fixtures import make_imagefolder
from torchvision.transforms import v2

VIEW = v2.Compose([v2.Resize(18, antialias=True), v2.CenterCrop(16)])


def _noise_folder(root: Path, classes=("a", "b", "c"), per_class: int = 5, size=(40, 30)) -> Path:
    """An ImageFolder of seeded noise PNGs (lossless: pixels are known exactly)."""
    rng = np.random.default_rng(0)
    for name in classes:
        for j in range(per_class):
            path = root / name / f"{name}_{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return root


def _split(root: Path):
    split, _ = load_imagefolder(root, 3)
    return split.with_transform(VIEW)


@pytest.mark.parametrize("workers", [0, 2])
def test_prepared_view_round_trips_exactly(tmp_path: Path, workers: int):
    split = _split(_noise_folder(tmp_path / "data"))
    fingerprint = split_fingerprint(split, "view")
    meta = build_prepared(split, tmp_path / "cache", fingerprint, (3, 16, 16), workers=workers, chunk=4)
    assert meta["num_images"] == 15 and meta["bytes"] == 15 * 3 * 16 * 16
    images, targets = open_prepared(tmp_path / "cache", fingerprint)
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 16, 16)
    assert torch.equal(images, split.load_all())              # the decoded + resized + cropped pixels
    assert targets.tolist() == list(np.asarray(split.targets))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["images.npy", "meta.json", "targets.npy"]
    images[0] += 1  # copy-on-write: the file is never modified through the mapping
    assert torch.equal(open_prepared(tmp_path / "cache", fingerprint)[0], split.load_all())


def test_fingerprint_changes_when_a_file_changes_and_the_cache_is_rebuilt(tmp_path: Path):
    root = _noise_folder(tmp_path / "data")
    split = _split(root)
    first = prepared_split(split, tmp_path / "cache", "view", (3, 16, 16))
    fingerprint = split_fingerprint(split, "view")
    assert split_fingerprint(_split(root), "view") == fingerprint          # stable while nothing changes
    assert split_fingerprint(split, "another view") != fingerprint
    # Rewrite one image with other pixels of the same size and format.
    victim = root / "b" / "b_2.png"
    Image.fromarray(np.full((30, 40, 3), 7, dtype=np.uint8)).save(victim)
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = _split(root)
    assert split_fingerprint(changed, "view") != fingerprint
    assert open_prepared(tmp_path / "cache" / fingerprint[:24], split_fingerprint(changed, "view")) is None
    second = prepared_split(changed, tmp_path / "cache", "view", (3, 16, 16))
    index = [Path(p).name for p in changed.paths].index("b_2.png")
    assert torch.all(second[0][index] == 7) and not torch.all(first[0][index] == 7)
    assert torch.equal(second[0], changed.load_all())


def test_unfinished_or_foreign_cache_is_not_used(tmp_path: Path):
    split = _split(_noise_folder(tmp_path / "data", per_class=2))
    fingerprint = split_fingerprint(split, "view")
    assert open_prepared(tmp_path / "nothing", fingerprint) is None
    build_prepared(split, tmp_path / "cache", fingerprint, (3, 16, 16))
    (tmp_path / "cache" / "meta.json").unlink()                       # killed before the last write
    assert open_prepared(tmp_path / "cache", fingerprint) is None
    assert not list((tmp_path / "cache").glob(".images.*"))           # no partial file left behind


def test_too_little_disk_is_refused_before_writing(tmp_path: Path):
    with pytest.raises(DataError, match=r"the prepared cache needs .* GiB but .* GiB free: use a larger disk"):
        check_free_space(tmp_path / "not-yet", 1 << 62, "the prepared cache", "use a larger disk")


def test_context_serves_image_files_from_the_prepared_cache(tmp_path: Path, monkeypatch):
    from cdabench.config import Task
    from cdabench.engine.context import eval_transform, open_context
    from cdabench.engine.train import ImageBank
    make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=6, size=(40, 30))
    monkeypatch.setenv("CDABENCH_CACHE", str(tmp_path / "cache"))
    task = Task(name="folder", dataset="imagefolder", image_size=16, ipcs=(1,), holdout_per_class=1)
    ctx = open_context(task, str(tmp_path / "data"), "cpu")
    bank = ctx.source("fit")
    assert isinstance(bank, ImageBank) and len(list((tmp_path / "cache" / "prepared").iterdir())) == 1
    expected = ctx.fit.with_transform(eval_transform(ctx.data)).load_all()
    assert torch.equal(bank.images, expected)
    monkeypatch.setenv("CDABENCH_PREPARED", "0")
    plain = open_context(task, str(tmp_path / "data"), "cpu").source("fit")
    assert torch.equal(plain.images, expected)


def test_processes_asking_at_once_wait_for_one_build(tmp_path: Path, monkeypatch):
    """Ranks and workers ask for a split whenever they need it (no collective call): the first
    builds under the lock, the others wait and map the same file."""
    import threading

    from cdabench.data import prepared
    split = _split(_noise_folder(tmp_path / "data"))
    builds, real_build = [], prepared.build_prepared

    def counted(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(prepared, "build_prepared", counted)
    results = [None] * 3

    def ask(k):
        results[k] = prepared.prepared_split(split, tmp_path / "cache", "view", (3, 16, 16))

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert all(torch.equal(r[0], split.load_all()) for r in results)
