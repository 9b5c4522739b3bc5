"""Disk and memory are checked before a stage starts: the estimate is printed, and a stage that
cannot fit is refused with the sizes and the fix, before anything is written."""
from __future__ import annotations

import shutil

import pytest

from cdabench import progress
from cdabench.data import DataError
from cdabench.data import resources
from cdabench.distill.sets import distill, load_distilled


def test_images_on_disk_are_estimated_by_format_and_refused_beyond_the_free_space(tmp_path):
    png = resources.check_images_on_disk(tmp_path / "out", 100, (3, 64, 64), "png", "a set")
    assert png == 100 * 3 * 64 * 64
    assert resources.check_images_on_disk(tmp_path / "out", 100, (3, 64, 64), "jpeg75", "a set") == png // 4
    with pytest.raises(DataError, match=r"a set needs .* GiB but .* GiB free: free disk space, or write --out"):
        resources.check_images_on_disk(tmp_path / "out", 1 << 40, (3, 224, 224), "png", "a set")
    assert not (tmp_path / "out").exists()


def test_memory_beyond_what_is_available_is_refused():
    available = resources.available_memory()
    assert available is not None and available > 0
    resources.check_free_memory(1 << 20, "a megabyte", "never")
    with pytest.raises(DataError, match=r"a set holds .* GiB in memory but .* GiB is available: evaluate less"):
        resources.check_free_memory(available * 4, "a set", "evaluate less")


def test_distill_prints_its_disk_estimate_and_writes_nothing_when_the_disk_is_full(tiny_ctx, tiny_teacher, tmp_path,
                                                                                     monkeypatch):
    lines = []
    monkeypatch.setattr(progress, "log", lines.append)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 1 << 40, 0))
    with pytest.raises(DataError, match=r"distill random ipc 2 needs .* GiB but .* has 0.0 GiB free"):
        distill(tiny_ctx, "random", 2, 0, tmp_path / "set", teacher=tiny_teacher)
    assert not (tmp_path / "set").exists()
    assert any(line.startswith("distill random ipc 2: 20 images of 1x8x8 as png") for line in lines)


def test_a_set_larger_than_the_memory_is_refused_before_it_is_loaded(tiny_ctx, tiny_teacher, tmp_path, monkeypatch):
    distill(tiny_ctx, "random", 2, 0, tmp_path / "set", teacher=tiny_teacher)
    monkeypatch.setattr(resources, "available_memory", lambda: 100)
    with pytest.raises(DataError, match=r"the distilled set in .* holds .* GiB in memory but .* available"):
        load_distilled(tiny_ctx, tmp_path / "set")
