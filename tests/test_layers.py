"""The package's layers and its acyclic packages, as import-linter contracts (pyproject.toml).

Bottom to top: files/errors, models, data, eval, more/eeqa, run, methods, fl,
serving/zoo, benchmark/demo, cli; each imports only from below it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: `pip install -e '.[dev]'` installs import-linter")
    return found


def test_import_contracts_hold():
    result = subprocess.run(
        [_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The contract is live: a config whose layers put `run` above `fl` is broken by today's imports."""
    text = (ROOT / "pyproject.toml").read_text()
    start = text.index("[tool.importlinter]")
    config = text[start:].replace(
        '    "smartfed.fl",\n    "smartfed.methods",\n    "smartfed.run",\n',
        '    "smartfed.run",\n    "smartfed.fl",\n    "smartfed.methods",\n',
    )
    assert config != text[start:]
    (tmp_path / "contracts.toml").write_text(config)
    result = subprocess.run(
        [_lint_imports(), "--no-cache", "--config", str(tmp_path / "contracts.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "SmartFed layers BROKEN" in result.stdout
