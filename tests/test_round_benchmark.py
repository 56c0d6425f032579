"""Smoke test of benchmarks/round.py: it runs and prints what it promises (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "round.py"


@pytest.fixture
def bench() -> Iterator[ModuleType]:
    """benchmarks/round.py, imported as a module for the test's duration."""
    spec = importlib.util.spec_from_file_location("benchmarks_round", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_round_benchmark_quick(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "threads" in out and "hidden 576" in out
    assert "MAC vs LoRA" in out
    # the default pools (M = 32 and 64), each router without and with expert statistics
    for router, experts, stats in itertools.product(("linear", "rank"), (32, 64), ("", " stats")):
        name = f"SmartFed {router} M={experts}{stats}"
        rows = [line for line in out.splitlines() if re.match(rf"\s*{name}\s+[\d,]", line)]
        # one row each for step time, memory and uplink, every one with a ratio and a verdict
        assert len(rows) == 3, f"expected 3 rows for {name} in:\n{out}"
        assert re.search(r"\|\s+\d+\.\d{3}\s+\d+\.\d{3}-\d+\.\d{3}\s+<= \d\.\d\d (PASS|MISS)", rows[0]), rows[0]
        for row in rows[1:]:
            assert re.search(r"\|\s+\d+\.\d{3}\s+<= \d\.\d\d (PASS|MISS)", row), row
        assert re.search(r"\|\s+\d+\.\d\d$", rows[0]), rows[0]  # the arithmetic ratio ends the time row
        bytes_line = next(line for line in out.splitlines() if line.strip().startswith(f"bytes {name}:"))
        assert re.search(r"router [\d,]+ B \+ importance [\d,]+ B = [\d,]+ B vs LoRA A\+B [\d,]+ B", bytes_line)
        importance = int(re.search(r"importance ([\d,]+) B", bytes_line)[1].replace(",", ""))
        assert (importance > 0) == bool(stats)  # the importance is sent only when the statistics run
    lora = [line for line in out.splitlines() if line.strip().startswith("LoRA (FedIT)")]
    assert len(lora) == 3, out


def test_low_rank_macs_against_hand_counts(bench: ModuleType) -> None:
    shapes = [(576, 576), (576, 192)]
    # LoRA r = 32 on q (576 -> 576): 6 matmuls of 32 x 576 per token.
    assert bench.low_rank_macs(None, 32, shapes[:1]) == 6 * 32 * 576
    # Rank router, M = 32 on v (576 -> 192): A x, B h, ∂h, ∂x (4 M (d_in + d_out) / 2) and three M x M.
    assert bench.low_rank_macs("rank", 32, shapes[1:]) == 2 * 32 * (576 + 192) + 3 * 32 * 32
    # Linear router: its W_r (M, d_in) doubles the matmuls on the input side.
    assert bench.low_rank_macs("linear", 64, shapes) == 64 * (5 * 576 + 2 * 576) + 64 * (5 * 576 + 2 * 192)


def test_paired_ratio_cancels_a_drift_shared_by_both(bench: ModuleType) -> None:
    machine_speed = [1.0, 1.0, 1.6, 1.6, 1.6, 1.0]  # the machine slows down mid-run for both variants
    lora = [100.0 * f for f in machine_speed]
    other = [95.0 * f for f in machine_speed]
    other[0] = 130.0  # one outlier step
    median, low, high = bench.paired_ratio(other, lora)
    assert median == pytest.approx(0.95) and low == pytest.approx(0.95) and high == pytest.approx(0.95)
    # quartiles of a few repeats stay within the measured ratios (no extrapolation below the fastest)
    median, low, high = bench.paired_ratio([10.0, 100.0, 50.0], [100.0, 100.0, 100.0])
    # ratios 0.1, 0.5, 1.0: the inclusive quartiles interpolate inside them (the exclusive ones give 0.1 and 1.0)
    assert (median, low, high) == (pytest.approx(0.5), pytest.approx(0.3), pytest.approx(0.75))
    assert bench.paired_ratio([90.0], [100.0]) == (0.9, 0.9, 0.9)
