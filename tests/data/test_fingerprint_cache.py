"""The dataset fingerprint's cache: one directory scan finds a stored fingerprint (no stat of
every file), and any change a scan can see (a file added, or a new file moved into place) makes
it recomputed."""
from __future__ import annotations

import os

import pytest

from cdabench.data import create_dataset
from cdabench.data.images import ImageSplit
from tests.fixtures import class_colour, make_imagefolder, write_image


def test_a_cached_fingerprint_equals_the_full_one_and_is_read_without_a_stat_of_every_file(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    cache = tmp_path / "cache"
    full = create_dataset("imagefolder", root).fingerprint()
    assert create_dataset("imagefolder", root).fingerprint(cache) == full
    assert len(list(cache.glob("*.txt"))) == 1

    def no_file_stats(self, hasher):
        raise AssertionError("the stored fingerprint should have been used")
    monkeypatch.setattr(ImageSplit, "update_hash", no_file_stats)
    assert create_dataset("imagefolder", root).fingerprint(cache) == full


@pytest.mark.parametrize("change", ["file added", "file replaced"])
def test_a_change_one_scan_sees_recomputes_the_fingerprint(tmp_path, change):
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    cache = tmp_path / "cache"
    # Every folder dated an hour back: the change below moves a folder's mtime to now, whatever the
    # file system's timestamp granularity (ext4: 1 ns, FAT: 2 s) and however fast this test runs.
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        past = folder.stat().st_mtime_ns - 3600 * 10**9
        os.utime(folder, ns=(past, past))
    before = create_dataset("imagefolder", root).fingerprint(cache)
    if change == "file added":
        write_image(root / "train" / "a" / "a_9.png", class_colour(0), (40, 30))
    else:  # a re-encoded file moved into place, as tools that write atomically do
        write_image(tmp_path / "new.png", class_colour(1), (80, 60))
        os.replace(tmp_path / "new.png", root / "val" / "b" / "b_0.png")
    after = create_dataset("imagefolder", root).fingerprint(cache)
    assert after != before
    assert after == create_dataset("imagefolder", root).fingerprint()  # the full fingerprint, uncached
    assert len(list(cache.glob("*.txt"))) == 2


def test_a_damaged_stored_fingerprint_is_recomputed(tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=1)
    cache = tmp_path / "cache"
    full = create_dataset("imagefolder", root).fingerprint(cache)
    (stored,) = cache.glob("*.txt")
    stored.write_text("not a fingerprint")
    assert create_dataset("imagefolder", root).fingerprint(cache) == full
    assert stored.read_text() == full
