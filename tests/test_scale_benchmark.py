"""benchmarks/scale.py: its arithmetic on made-up records, and (slow) one real run on Flower's simulation engine."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture
def bench() -> Iterator[ModuleType]:
    """benchmarks/scale.py, imported as a module for the test's duration."""
    spec = importlib.util.spec_from_file_location("benchmarks_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_union_counts_overlaps_once(bench: ModuleType) -> None:
    assert bench.union_seconds([]) == 0
    assert bench.union_seconds([[0, 1], [2, 3]]) == pytest.approx(2)
    assert bench.union_seconds([[0, 2], [1, 3], [1.5, 1.7]]) == pytest.approx(3)  # two workers at once
    assert bench.union_seconds([[5, 6], [0, 10]]) == pytest.approx(10)  # unsorted, one inside the other


def test_rounds_from_metrics_and_client_timings(bench: ModuleType, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"round": 1, "train_seconds": 10.0, "eval_seconds": 0.0},
        {"round": 2, "train_seconds": 2.0, "eval_seconds": 0.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [
        {"pid": 1, "handler": [100.0, 108.0], "train": [107.0, 108.0], "round": 1, "partition": 0},
        # round 2: two workers train at once for part of the time
        {"pid": 1, "handler": [200.0, 201.2], "train": [200.1, 201.1], "round": 2, "partition": 3},
        {"pid": 2, "handler": [200.5, 201.7], "train": [200.6, 201.6], "round": 2, "partition": 4},
        {"pid": 2, "handler": [300.0, 300.1]},  # a reply without training (never counted)
    ]
    timings = tmp_path / "timings.jsonl"
    timings.write_text("".join(json.dumps(r) + "\n" for r in records))
    rounds, eval_seconds = bench.read_rounds(run, timings)
    assert eval_seconds == pytest.approx(0.5)
    first, second = rounds
    assert (first.clients, second.clients) == (1, 2)
    assert first.train_union == pytest.approx(1.0) and first.outside == pytest.approx(0.9)
    assert first.client_side == pytest.approx(0.7) and first.engine_side == pytest.approx(0.2)
    assert second.train_union == pytest.approx(1.5) and second.train_sum == pytest.approx(2.0)
    assert second.outside == pytest.approx(0.25)  # 2.0 s round, 1.5 s with someone training
    assert second.handler_union == pytest.approx(1.7) and second.engine_side == pytest.approx(0.15)


def test_report_compares_the_counts(bench: ModuleType) -> None:
    args = bench.parse_args(["--clients", "10,100", "--rounds", "2"])
    assert args.clients == [10, 100] and bench.sampled_for(100, args.sample_fraction) == 10
    assert bench.sampled_for(4, 0.1) == 1  # at least one client per round

    def result(clients: int, pss: int, round2: float, union: float) -> object:
        peaks = bench.TreePeaks(root=0, rss=2 * pss, pss=pss, processes=9)
        rounds = [bench.Round(1, 20.0, 1, 1.0, 1.0, 5.0), bench.Round(2, round2, 10, union, 2 * union, union)]
        return bench.Result(clients, bench.sampled_for(clients, 0.1), rounds, 60.0, peaks, 1.0)

    text = bench.report([result(10, 1000 * 2**20, 1.0, 0.9), result(100, 1100 * 2**20, 10.0, 7.0)], args, "m")
    assert "| 10 | 1 | 1000 | 2000 | 9 | 38.0 | 1.00 | 20.00 | 0.90 | 10% |" in text
    assert "| 100 | 10 | 1100 | 2200 |" in text and "| 30% |" in text
    assert "peak tree PSS with 100 clients / with 10: 1.10 (target <= 1.2, flat in the number of clients): PASS" in text
    assert "outside client training with 100 clients: 30% (target <= 20%): MISS" in text


def test_bad_options_are_refused(bench: ModuleType) -> None:
    for argv in (["--clients", "0,10"], ["--clients", "ten"], ["--sample-fraction", "0"], ["--hidden", "30"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_tree_memory_counts_a_child_process() -> None:
    from smartfed.benchmark.hardware import descendants, tree_memory

    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and child.pid not in descendants(os.getpid()):
            time.sleep(0.05)
        assert child.pid in descendants(os.getpid())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and tree_memory(child.pid).rss < 64 << 20:
            time.sleep(0.05)
        alone, with_me = tree_memory(child.pid), tree_memory(os.getpid())
        assert alone.processes == 1 and alone.rss >= 64 << 20
        assert with_me.processes >= 2 and with_me.rss > alone.rss
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_one_small_run_end_to_end(tmp_path: Path) -> None:
    """Two client counts on the real engine: the report names both, with memory and a timed client per round."""
    out = tmp_path / "scale.md"
    argv = ["--clients", "2,3", "--rounds", "2", "--local-steps", "1", "--hidden", "32", "--layers", "1"]
    argv += ["--output", str(out)]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--work-dir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert result.stdout == text
    for clients in (2, 3):
        row = next(line for line in text.splitlines() if line.startswith(f"| {clients} | 1 | "))
        pss, rss, processes = (int(x) for x in row.split("|")[3:6])
        assert 0 < pss <= rss and processes >= 3  # the driver, Ray's own processes, at least one worker
        every_round = rf"\| {clients} \| [12] \| [\d.]+ \| \d+ \| [\d.]+ / [\d.]+ \|"
        rounds = [line for line in text.splitlines() if re.match(every_round, line)]
        assert len(rounds) == 2 and all(line.split("|")[4].strip() == "1" for line in rounds), rounds
    assert re.search(r"memory: peak tree PSS with 3 clients / with 2: \d\.\d\d", text)
    assert re.search(r"overhead: share of a round outside client training with 3 clients: \d+%", text)
