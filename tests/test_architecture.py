"""Import directions: the import-linter contracts of pyproject.toml hold for the package (layers,
no cycles), and they do fail when a module imports against them."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.fixtures import REPO, child_env



def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter with this repository's contracts on the `cdabench` found under package_parent."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True))")
    env = child_env(PYTHONPATH=str(package_parent))
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_package_keeps_its_import_contracts():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_import_against_the_layers_or_a_cycle_breaks_a_contract(tmp_path):
    shutil.copytree(REPO / "cdabench", tmp_path / "cdabench", ignore=shutil.ignore_patterns("__pycache__"))
    schema = tmp_path / "cdabench" / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom cdabench import config  # noqa: E402\n")  # leaf -> edge, a cycle
    done = lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Layers: each layer imports only the layers below it BROKEN" in done.stdout
    assert "cdabench.schema -> cdabench.config" in done.stdout
    assert "No import cycles between sibling modules or packages, at any depth BROKEN" in done.stdout
