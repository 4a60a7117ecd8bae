"""The layers in pyproject.toml hold for the package, and `lint-imports` catches an import that points up or closes a
cycle: each case copies the package, adds one such import, and expects the contract that forbids it to fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the package at `root`, with the contracts of this repository's pyproject.toml."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_every_contract() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # The engine importing the CLI: an arrow pointing up.
        ("rehydrate/engine/catalog.py", "import rehydrate.cli", "Each layer imports only from the layers below it"),
        # A workflow doing database work itself.
        ("rehydrate/workflows/tail.py", "import asyncpg", "Workflows touch no database"),
        # The control tables' owner importing the fold that uses it: a cycle inside the engine.
        ("rehydrate/engine/catalog.py", "import rehydrate.engine.apply", "Inside the engine"),
        # What travels through Temporal reaching for the engine.
        ("rehydrate/models/tail.py", "import rehydrate.engine.catalog", "models import no other part"),
    ],
)
def test_an_upward_import_breaks_its_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    shutil.copytree(ROOT / "rehydrate", tmp_path / "rehydrate", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0, run.stdout
    # The report ends with a section per broken contract, headed by its name.
    assert "Broken contracts" in run.stdout, run.stdout
    assert broken in run.stdout.split("Broken contracts", 1)[1], run.stdout
