"""Avalanche is imported with its home in the cache: nothing written to ~, no QP-solver warning filter."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures import REPO, child_env


@pytest.mark.slow
def test_importing_avalanche_writes_nothing_to_home(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    code = ("import os, warnings; from cdabench.evaluate.continual import avalanche_env; "
            f"avalanche_env.load({str(cache)!r}); "
            "assert os.environ['HOME'] == " + repr(str(home)) + "; "
            "assert not any('QP solver' in str(f) for f in warnings.filters)")
    env = child_env(HOME=str(home), PYTHONWARNINGS="error::UserWarning")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "QP solver" not in done.stderr and done.stdout == ""
    assert list(home.iterdir()) == []
    assert (cache / "avalanche-home" / ".avalanche" / "config.json").is_file()
