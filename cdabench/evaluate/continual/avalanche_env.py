"""Avalanche, imported and run without side effects outside our folders.

`import avalanche` writes `~/.avalanche/config.json` (the folder is computed with
`os.path.expanduser` when `avalanche.benchmarks.datasets.dataset_utils` is imported), changes the
global warning filters, warns "no QP solver found" (qpsolvers, imported for GEM), and some of its
code paths print. `load(cache)` imports it once with HOME pointed at a folder inside our cache
directory (HOME is restored right after), and `quiet()` keeps its prints and warnings, including
the warning-filter change made by its `@deprecated` decorator, inside the block that runs it.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

_LOADED: SimpleNamespace | None = None


def avalanche_home(cache: str | Path) -> Path:
    """The stand-in HOME that Avalanche's import writes its `.avalanche/config.json` into."""
    return Path(cache) / "avalanche-home"


@contextlib.contextmanager
def _home(path: Path):
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old


@contextlib.contextmanager
def quiet():
    """Run Avalanche code with its stdout prints swallowed and its warnings recorded, not shown;
    the warning filters (which its `@deprecated` decorator changes globally) are restored on exit."""
    with warnings.catch_warnings(record=True), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="no QP solver found")
        warnings.filterwarnings("ignore", message="No loggers specified")
        yield


def load(cache: str | Path) -> SimpleNamespace:
    """The Avalanche names we use, imported once. The first import runs with HOME = a folder
    inside `cache`, so nothing is written to the real `~/.avalanche`."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    context = contextlib.nullcontext()
    if "avalanche" not in sys.modules:
        home = avalanche_home(cache)
        home.mkdir(parents=True, exist_ok=True)
        context = _home(home)
    with context, quiet():
        from avalanche.benchmarks.scenarios import class_incremental_benchmark
        from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset
        from avalanche.benchmarks.utils.data_attribute import DataAttribute, TaskLabels
        from avalanche.benchmarks.utils.data_loader import ReplayDataLoader
        from avalanche.benchmarks.utils.flat_data import ConstantSequence
        from avalanche.core import SupervisedPlugin
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.storage_policy import ExemplarsBuffer
        from avalanche.training.supervised import DER, ER_ACE, EWC, GDumb, LwF, Naive
    _LOADED = SimpleNamespace(
        class_incremental_benchmark=class_incremental_benchmark,
        TaskAwareSupervisedClassificationDataset=TaskAwareSupervisedClassificationDataset,
        DataAttribute=DataAttribute, TaskLabels=TaskLabels, ConstantSequence=ConstantSequence,
        ReplayDataLoader=ReplayDataLoader, SupervisedPlugin=SupervisedPlugin, EvaluationPlugin=EvaluationPlugin,
        ExemplarsBuffer=ExemplarsBuffer, Naive=Naive, GDumb=GDumb, LwF=LwF, EWC=EWC, DER=DER, ER_ACE=ER_ACE)
    return _LOADED
