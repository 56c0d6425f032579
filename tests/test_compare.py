"""``smartfed report`` on synthetic run folders (known numbers → known table) and ``smartfed compare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smartfed.benchmark import compare as compare_module
from smartfed.benchmark.report import human_bytes, write_report
from smartfed.cli import app
from smartfed.run.config import RunConfig
from smartfed.run.folder import RunFolder

ESTIMATE = "codecarbon estimate: TDP x CPU load, no RAPL (not a measurement)"


def _row(rnd: int, score: float | None, up: int, wall: float, kwh: float | None) -> dict:
    return {
        "round": rnd,
        "eval_metric": "exact_match",
        "eval_score": score,
        "bytes_up": up,
        "wall_seconds": wall,
        "energy_kwh": kwh,
        "energy_method": ESTIMATE if kwh is not None else "disabled",
    }


def _write_run(path: Path, method: str, seed: int, rows: list[dict], *, finished: bool = True, **config) -> Path:
    folder = RunFolder(path)
    folder.write_config({"method": method, "seed": seed, "task": "arith", "num_rounds": 2, "lora_rank": 4, **config})
    folder.write_metrics(rows)
    if finished:
        folder.write_summary({"method": method, "rounds": len(rows)})
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "cmp"
    _write_run(root / "alpha/seed0", "alpha", 0, [_row(1, 0.2, 1000, 1.0, 0.001), _row(2, 0.5, 1000, 2.0, 0.002)])
    _write_run(root / "alpha/seed1", "alpha", 1, [_row(1, 0.6, 1000, 2.0, 0.002), _row(2, 0.7, 3000, 3.0, 0.002)])
    # beta: evaluated only at round 2, one round without energy, and another rank
    _write_run(
        root / "beta/seed0", "beta", 0, [_row(1, None, 10, 1.0, None), _row(2, 0.3, 10, 1.0, 0.001)], lora_rank=8
    )
    _write_run(
        root / "beta/seed1", "beta", 1, [_row(1, None, 10, 1.0, 0.001), _row(2, 0.5, 30, 1.0, 0.001)], lora_rank=8
    )
    return root


def _table(md: str) -> dict[str, list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_report_table_from_known_numbers(runs):
    path = write_report([runs], runs, target=0.6)
    md = path.read_text()
    assert "| method | seeds | final exact_match (mean ± std) | rounds to exact_match ≥ 0.6 |" in md
    table = _table(md)
    # alpha: finals 0.5, 0.7 → 0.6 ± 0.1414; only seed 1 reaches 0.6, at round 1; uplink 2000, 4000 B;
    # wall 3, 5 s; energy 0.003, 0.004 kWh
    assert table["alpha"] == [
        "0, 1",
        "0.600 ± 0.141",
        "1.0 ± 0.0 (1/2 seeds)",
        "3 kB ± 1.41 kB",
        "4.0 ± 1.4",
        "0.0035 ± 0.000707",
    ]
    # beta: the last evaluated round counts (round 2); never reaches 0.6; a round without energy → no total
    assert table["beta"] == ["0, 1", "0.400 ± 0.141", "never (0/2 seeds)", "30 B ± 14 B", "2.0 ± 0.0", "—"]
    assert f"Energy: {ESTIMATE}; disabled." in md
    assert "Settings that differ between runs: `lora_rank` [4, 8]." in md
    assert "not paired" not in md and "Unfinished" not in md
    data = json.loads((runs / "comparison.json").read_text())
    assert data["methods"]["alpha"]["final"] == pytest.approx([0.6, 0.1414213562])
    assert data["methods"]["beta"]["reached"] == 0
    for name in ("metric_vs_round.png", "metric_vs_uplink.png"):
        assert (runs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(runs.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_report_flags_unpaired_unfinished_and_option_variants(tmp_path):
    _write_run(tmp_path / "a0", "alpha", 0, [_row(1, 0.5, 1, 1.0, None)])
    _write_run(tmp_path / "a1", "alpha", 1, [_row(1, 0.5, 1, 1.0, None)], method_options="k=1", finished=False)
    _write_run(tmp_path / "b", "beta", 5, [_row(1, 0.1, 1, 1.0, None)])
    md = write_report([tmp_path], tmp_path, plots=False).read_text()
    table = _table(md)
    assert set(table) == {"alpha", "alpha [k=1]", "beta"}  # an option variant is its own line
    assert table["alpha"][:2] == ["0", "0.500 ± 0.000"] and len(table["alpha"]) == 5  # no target column
    assert "Unfinished runs (no summary.json) in: alpha [k=1]." in md
    assert "not paired" in md
    assert not (tmp_path / "metric_vs_round.png").exists()


def test_report_skips_and_lists_damaged_runs_and_flags_failed_ones(tmp_path):
    _write_run(tmp_path / "a0", "alpha", 0, [_row(1, 0.5, 1, 1.0, None)])
    _write_run(tmp_path / "a1", "alpha", 1, [_row(1, 0.7, 1, 1.0, None)])
    _write_run(tmp_path / "torn", "alpha", 2, [_row(1, 0.9, 1, 1.0, None)])
    (tmp_path / "torn" / "metrics.jsonl").write_bytes(b'{"round": 1, "eval_sc')  # a torn write
    failed = _write_run(tmp_path / "b", "beta", 0, [_row(1, 0.1, 1, 1.0, None)])
    RunFolder(failed).write_summary({"status": "failed", "reason": "every round (1) was skipped"})
    md = write_report([tmp_path], tmp_path, plots=False).read_text()
    assert _table(md)["alpha"][:2] == ["0, 1", "0.600 ± 0.141"]  # the torn run is not in the mean
    assert "Skipped damaged runs: `" in md and "torn" in md and "metrics.jsonl" in md
    assert "Failed runs (they trained nothing; summary.json says why): `" in md
    assert "(every round (1) was skipped)" in md
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [Path(p).name for p in saved["skipped_damaged"]] == ["torn"]
    assert list(saved["failed"].values()) == ["every round (1) was skipped"]
    (tmp_path / "a0" / "config.json").write_text("{not json")
    (tmp_path / "a1" / "config.json").write_text("{not json")
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="no readable run folder"):
        write_report([tmp_path], tmp_path, plots=False)


def test_report_needs_output_when_the_runs_share_no_run_tree(tmp_path):
    one = _write_run(tmp_path / "x" / "deep" / "er" / "one", "alpha", 0, [_row(1, 0.5, 1, 1.0, None)])
    two = _write_run(tmp_path / "y" / "two", "alpha", 1, [_row(1, 0.7, 1, 1.0, None)])
    result = CliRunner().invoke(app, ["report", str(one), str(two), "--no_plots"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "share no run tree" in lines[0] and "give --output" in lines[0]
    assert not (tmp_path / "comparison.md").exists()
    ok = CliRunner().invoke(app, ["report", str(one), str(two), "--no_plots", "--output", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "comparison.md").is_file()


def test_human_bytes():
    assert [human_bytes(n) for n in (999, 1000, 1_234_567, 2.5e9)] == ["999 B", "1 kB", "1.23 MB", "2.5 GB"]


def test_report_cli(runs, tmp_path):
    result = CliRunner().invoke(app, ["report", str(runs / "alpha"), str(runs / "beta"), "--no_plots"])
    assert result.exit_code == 0, result.output
    assert (runs / "comparison.md").is_file()  # the runs' common folder
    assert "| alpha | 0, 1 | 0.600 ± 0.141 |" in result.output
    single = CliRunner().invoke(app, ["report", str(runs / "beta/seed0"), "--no_plots"])
    assert single.exit_code == 0 and (runs / "beta/comparison.md").is_file()  # a run folder's parent
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["report", str(empty)])
    assert result.exit_code == 2 and "no run folder" in result.output


# --- compare ---------------------------------------------------------------------------------------
def test_compare_runs_each_method_and_seed_once_on_identical_settings(tmp_path, monkeypatch):
    """The orchestration, with the federation replaced by a stand-in that writes a run folder."""
    calls: list[RunConfig] = []

    def fake_run(config: RunConfig, **_: object) -> None:
        calls.append(config)
        score = 0.1 * (config.seed + 1) + (0.5 if config.method == "fedit" else 0.0)
        rows = [_row(r, score, 100, 1.0, None) for r in (1, 2)]
        folder = RunFolder(config.output_dir)
        folder.write_config(config.to_dict())
        folder.write_metrics(rows)
        for r in (1, 2):  # like a real run: a checkpoint per recorded round, so a longer run may resume it
            folder.save_checkpoint(r, {"w": torch.zeros(1)}, {})
        folder.write_summary({"method": config.method})

    import smartfed.fl.simulation as simulation

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    base = RunConfig(model_name_or_path="m", lora_pool="p", seed=3, num_rounds=2, energy="none")
    out = tmp_path / "cmp"
    report = compare_module.compare(base, ["fedit", "flora"], [3, 4], out, target=0.95)
    assert [(c.method, c.seed) for c in calls] == [("fedit", 3), ("fedit", 4), ("flora", 3), ("flora", 4)]
    for config in calls:
        assert config.output_dir == str(out / config.method / f"seed{config.seed}")
        assert {k: v for k, v in config.to_dict().items() if k not in ("method", "seed", "output_dir")} == {
            k: v for k, v in base.to_dict().items() if k not in ("method", "seed", "output_dir")
        }
    table = _table(report.read_text())
    assert table["fedit"][:3] == ["3, 4", "0.950 ± 0.071", "1.0 ± 0.0 (1/2 seeds)"]
    assert table["flora"][:3] == ["3, 4", "0.450 ± 0.071", "never (0/2 seeds)"]
    # a second call reuses the finished runs; a changed setting runs again
    compare_module.compare(base, ["fedit", "flora"], [3, 4], out)
    assert len(calls) == 4
    compare_module.compare(RunConfig(**{**base.to_dict(), "num_rounds": 3}), ["fedit"], [3], out)
    assert len(calls) == 5


def test_compare_resumes_a_shorter_run_and_refuses_a_folder_of_other_settings(tmp_path, monkeypatch):
    """A run folder is never mixed: same settings but fewer rounds are resumed, other settings refused up front."""
    calls: list[tuple[RunConfig, bool]] = []

    def fake_run(config: RunConfig, resume: bool = False, **_: object) -> None:
        calls.append((config, resume))
        RunFolder(config.output_dir).write_config(config.to_dict())
        RunFolder(config.output_dir).write_metrics([_row(1, 0.5, 1, 1.0, None)])  # round 1 only: unfinished

    import smartfed.fl.simulation as simulation

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    base = RunConfig(model_name_or_path="m", lora_pool="p", seed=3, num_rounds=2, energy="none")
    out = tmp_path / "cmp"
    compare_module.compare(base, ["fedit"], [3], out)  # unfinished (no summary.json): the next call resumes
    compare_module.compare(RunConfig(**{**base.to_dict(), "num_rounds": 3}), ["fedit"], [3], out)
    assert [resume for _, resume in calls] == [False, True]
    other = RunConfig(**{**base.to_dict(), "learning_rate": 0.1})
    with pytest.raises(FileExistsError, match="holds a SmartFed run"):
        compare_module.compare(other, ["fedit"], [3], out)
    (tmp_path / "cmp2" / "fedit" / "seed3").mkdir(parents=True)
    (tmp_path / "cmp2" / "fedit" / "seed3" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a SmartFed run folder"):
        compare_module.compare(base, ["fedit"], [3], tmp_path / "cmp2")
    assert len(calls) == 2  # refused before running anything


def test_compare_goes_on_past_a_run_that_trained_nothing_and_lists_it(tmp_path, monkeypatch):
    from smartfed.errors import RunFailed

    def fake_run(config: RunConfig, **_: object) -> None:
        folder = RunFolder(config.output_dir)
        folder.write_config(config.to_dict())
        folder.write_metrics([_row(1, 0.5, 100, 1.0, None)])
        if config.method == "fedit":
            folder.write_summary({"method": config.method, "status": "failed", "reason": "loss not finite"})
            raise RunFailed("run failed: loss not finite")
        folder.write_summary({"method": config.method, "status": "completed", "reason": None})

    import smartfed.fl.simulation as simulation

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    base = RunConfig(model_name_or_path="m", lora_pool="p", num_rounds=1, energy="none")
    md = compare_module.compare(base, ["fedit", "flora"], [0], tmp_path / "cmp").read_text()
    assert set(_table(md)) == {"fedit", "flora"}  # flora ran after fedit failed
    assert "Failed runs" in md and "(loss not finite)" in md


def test_compare_rejects_unknown_methods_and_bad_seeds():
    with pytest.raises(ValueError, match="nosuch"):
        compare_module.parse_methods("fedit,nosuch")
    assert compare_module.parse_methods(" fedit, flora ,fedit") == ["fedit", "flora"]
    with pytest.raises(ValueError, match="--seeds 0"):
        compare_module.seed_list(0, 0)
    assert compare_module.seed_list(7, 3) == [7, 8, 9]


@pytest.mark.slow
def test_compare_cli_two_methods_two_seeds(tmp_path):
    from .conftest import save_tiny_assets

    model_dir, a, b = save_tiny_assets(tmp_path / "assets")
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "fedit,fedsa", "--seeds", "2", "--target", "0.5"]
    args += ["--model_name_or_path", str(model_dir), "--lora_pool", f"{a},{b}", "--output_dir", str(out)]
    args += ["--num_clients", "3", "--sample_clients", "2", "--num_rounds", "2", "--local_steps", "1"]
    args += ["--batch_size", "4", "--num_train", "24", "--num_test", "4", "--max_length", "32"]
    args += ["--max_new_tokens", "2", "--lora_rank", "2", "--energy", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = _table((out / "comparison.md").read_text())
    assert set(table) == {"fedit", "fedsa"} and all(cells[0] == "0, 1" for cells in table.values())
    for seed in (0, 1):  # identical client sampling for both methods under one seed
        sampled = [
            [
                json.loads(line)["clients"]
                for line in (out / m / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
            ]
            for m in ("fedit", "fedsa")
        ]
        assert sampled[0] == sampled[1]


def test_compare_cli_errors_are_one_line():
    base = ["compare", "--model_name_or_path", "m", "--lora_pool", "p"]
    result = CliRunner().invoke(app, [*base, "--methods", "fedit,nosuch"])
    assert result.exit_code == 2 and "unknown method 'nosuch'" in result.output and "Traceback" not in result.output
    assert CliRunner().invoke(app, base).exit_code == 2  # --methods is required
    help_text = CliRunner().invoke(app, ["compare", "--help"], terminal_width=200).output
    assert "--methods" in help_text and "--seeds" in help_text and "--num_rounds" in help_text
    assert "--method " not in help_text  # --methods replaces the run's --method
