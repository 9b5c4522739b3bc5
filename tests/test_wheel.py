"""The package as a user gets it: a wheel built from this tree, installed (not editable) into a
fresh virtual environment, run from an empty folder. The packaged tasks, baselines, suites and
targets must be found there, with no source checkout in sight.

The fresh environment borrows the running interpreter's site-packages through a .pth file
(torch, timm and Avalanche are gigabytes; reinstalling them proves nothing about cdabench), and
the wheel goes in with --no-deps --no-index, so nothing is downloaded."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.fixtures import REPO, child_env, suite_file, tiny_task_file


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of a clean copy of the tree (the build leaves build/ and *.egg-info behind, not in the checkout)."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "cdabench", source / "cdabench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-q", "-w", tmp_path / "dist", source], tmp_path, dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("cdabench-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    # The borrowed site-packages come after the venv's own, so the wheel's cdabench wins over any
    # (editable) cdabench installed there; .pth files inside a borrowed folder are not run, so the
    # folders are every site-packages this interpreter sees, also those a .pth of its own added.
    borrowed = dict.fromkeys([*site.getsitepackages(), *(p for p in sys.path if Path(p).name == "site-packages")])
    (venv_site / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    done = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
                tmp_path, dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


@pytest.mark.slow
def test_an_installed_wheel_lists_and_runs_a_suite_from_an_empty_folder(tmp_path):
    """list, run, distill, evaluate, leaderboard and check, as a user of the wheel runs them."""
    wheel = _build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for name in ("tasks/digits.toml", "baselines/sre2l.toml", "suites/smoke.toml", "leaderboards/targets.csv",
                 "leaderboards/published.csv", "leaderboards/published_continual.csv"):
        assert f"cdabench/builtin/{name}" in shipped, f"{name} is not in the wheel"
    venv = _fresh_venv(tmp_path, wheel)

    empty = tmp_path / "empty"
    empty.mkdir()
    # No PYTHONPATH (the checkout's cdabench must not be found) and no active virtual environment.
    env = {k: v for k, v in child_env(CDABENCH_CACHE=str(tmp_path / "cache"), MPLCONFIGDIR=str(tmp_path / "mpl")).items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([venv / "bin" / "python", "-c", "import cdabench; print(cdabench.__file__)"], empty, env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr

    listed = _run([venv / "bin" / "cdabench", "list"], empty, env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in listed.stdout.splitlines()}
    assert {"digits", "digits-smoke", "tiny-imagenet", "imagenet-1k"} <= {t.strip() for t in lines["tasks"].split(",")}
    assert {"cda", "sre2l", "random", "herding", "full", "noise"} <= {m.strip() for m in lines["methods"].split(",")}
    assert {"smoke", "cross-arch", "continual"} <= {s.strip() for s in lines["suites"].split(",")}

    # A user's own task and suite, passed by path, from a folder that holds nothing else.
    task = tiny_task_file(empty / "tiny.toml")
    suite = suite_file(empty / "tiny-suite.toml", task, {
        "description": "random real images on the tiny digits task, one student, one seed",
        "methods": ["random"], "labels": ["hard"], "hard_label_methods": None})
    ran = _run([venv / "bin" / "cdabench", "run", "--suite", suite, "--out", "run", "--device", "cpu",
                "--workers", "1", "--quiet"], empty, env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert len((empty / "run" / "records.jsonl").read_text().splitlines()) == 1

    # distill, evaluate and leaderboard, as the installed command runs them, on the same task.
    common = ["--task", task, "--device", "cpu", "--quiet"]
    distilled = _run([venv / "bin" / "cdabench", "distill", *common, "--method", "random", "--ipc", "1", "--out", "set"],
                     empty, env)
    assert distilled.returncode == 0, distilled.stdout + distilled.stderr
    manifest = json.loads((empty / "set" / "manifest.json").read_text())
    assert manifest["method"] == "random" and len(manifest["files"]) == 10
    evaluated = _run([venv / "bin" / "cdabench", "evaluate", *common, "--data", "set", "--labels", "hard",
                      "--student", "resnet18", "--epochs", "1", "--out", "evaluated"], empty, env)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    (record,) = [json.loads(line) for line in (empty / "evaluated" / "records.jsonl").read_text().splitlines()]
    assert (record["method"], record["ipc"], record["student"], record["labels"]) == ("random", 1, "resnet18", "hard")
    board = _run([venv / "bin" / "cdabench", "leaderboard", "--runs", "run", "evaluated", "--out", "board"], empty, env)
    assert board.returncode == 0, board.stdout + board.stderr
    page = (empty / "board" / "tiny.md").read_text()
    assert "- records: 2 " in page and "## IPC 1" in page and "## IPC 2" in page
    assert len((empty / "board" / "tiny.csv").read_text().splitlines()) == 1 + 2
    assert list((empty / "board").glob("*.png"))

    # `check` with no --targets reads the packaged targets (the smoke suite's cells, absent here).
    checked = _run([venv / "bin" / "cdabench", "check", "--suite", suite, "--records", "run"], empty, env)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "MISSING   digits-smoke cda ipc10 test_resnet soft" in checked.stdout
