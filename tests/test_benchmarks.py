"""Smoke test of the benchmarks: they run and print what they promise (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
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


def test_variants_table_pairs_systems_on_shared_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from .test_claims import _write_run

    bench = _load("variants")
    rng = np.random.default_rng(1)
    for seed in (0, 1, 2):  # b scores 0.10 above a on every seed; bytes per round 2000 vs 1000 (per client: half)
        _write_run(tmp_path / "a" / f"seed{seed}", seed, [0.3, 0.4], bytes_per_round=2000, seconds=1, rng=rng)
        _write_run(tmp_path / "b" / f"seed{seed}", seed, [0.4, 0.5], bytes_per_round=1000, seconds=1, rng=rng)
    for folder in tmp_path.glob("*/seed*"):  # per-client bytes, as the server writes them beside the totals
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row["bytes_up_per_client"] = row["bytes_down_per_client"] = row["bytes_up"] / 2
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "table.md"
    bench.main([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--reference", "a", "--output", str(out_file)])
    out = capsys.readouterr().out
    assert out_file.read_text() == out
    row_a = next(line for line in out.splitlines() if line.startswith("| a |"))
    row_b = next(line for line in out.splitlines() if line.startswith("| b |"))
    assert "0.400 ± 0.000 | 0.400, 0.400, 0.400 |  |" in row_a and "0.001 MB" in row_a
    point, low, high = map(
        float, re.search(r"\| ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] \(seeds \[0, 1, 2\]\)", row_b).groups()
    )
    assert point == pytest.approx(0.1) and low < point < high and "0.0005 MB" in row_b
    with pytest.raises(SystemExit):
        bench.main([f"a={tmp_path / 'a'}", "--reference", "missing"])
