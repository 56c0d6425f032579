"""Smoke test of benchmarks/round.py: it runs and prints what it promises (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "round.py"


def test_round_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("benchmarks_round", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
        assert bench.main(["--quick", "--device", "cpu"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    out = capsys.readouterr().out
    assert "torch" in out and "threads" in out and "hidden 576" in out
    for router in ("linear", "rank"):
        rows = [line for line in out.splitlines() if line.strip().startswith(f"SmartFed {router} ")]
        # one row each for step time, memory and uplink, every one with a ratio and a verdict
        assert len(rows) == 3, f"expected 3 rows for the {router} router in:\n{out}"
        for row in rows:
            assert re.search(r"\|\s+\d+\.\d{3}\s+<= \d\.\d\d (PASS|MISS)", row), row
        bytes_line = next(line for line in out.splitlines() if line.strip().startswith(f"bytes SmartFed {router}:"))
        assert re.search(r"router [\d,]+ B \+ importance [\d,]+ B = [\d,]+ B vs LoRA A\+B [\d,]+ B", bytes_line)
    lora = [line for line in out.splitlines() if line.strip().startswith("LoRA (FedIT)")]
    assert len(lora) == 3, out
