"""Smoke test of the benchmarks: they run and print what they promise (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_more_layer_quick(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("more_layer")
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "activation memory saved for backward" in out
    assert "threads" in out and "torch" in out
    for router in ("linear", "rank"):
        rows = [line for line in out.splitlines() if re.match(rf"\s*\d+\s+\d+\s+{router}\s+\d+\s+\|", line)]
        assert rows, f"no row for the {router} router in:\n{out}"
        for row in rows:
            assert re.search(r"\d+\.\d+\s+(PASS|MISS)", row), row
