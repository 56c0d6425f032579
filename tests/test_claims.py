"""The claims' arithmetic on planted run folders: costs to FedIT's final score, intervals, verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smartfed.benchmark.claims import composite_claims, load_systems, main, verdict

N = 200  # held-out items


def _write_run(folder: Path, seed: int, scores: list[float], *, bytes_per_round: int, seconds: float, rng) -> None:
    """A finished run folder whose evaluated rounds score ``scores`` (per-item 0/1 with those means)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "method": folder.parent.name}))
    rows = []
    for r, score in enumerate(scores, start=1):
        items = np.zeros(N)
        items[rng.permutation(N)[: round(score * N)]] = 1.0
        rows.append(
            {
                "round": r,
                "eval_score": float(items.mean()),
                "eval_items": items.tolist(),
                "bytes_up": bytes_per_round // 2,
                "bytes_down": bytes_per_round // 2,
                "train_seconds": seconds,
                "train_kwh": seconds * 1e-5,
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text("{}")


@pytest.fixture
def planted(tmp_path) -> Path:
    """FedIT reaches 0.5 at its last round (5); SmartFed reaches it at round 2 with 1/40 of the bytes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "json_math"
    for seed in (0, 1, 2):
        _write_run(
            root / "fedit" / f"seed{seed}", seed, [0.1, 0.2, 0.3, 0.4, 0.5], bytes_per_round=40_000, seconds=10, rng=rng
        )
        _write_run(
            root / "smartfed" / f"seed{seed}",
            seed,
            [0.3, 0.55, 0.6, 0.62, 0.65],
            bytes_per_round=1_000,
            seconds=10,
            rng=rng,
        )
        _write_run(root / "merge" / f"seed{seed}", seed, [0.05] * 5, bytes_per_round=0, seconds=1, rng=rng)
        _write_run(
            root / "smartfed_data10" / f"seed{seed}",
            seed,
            [0.5, 0.52, 0.5, 0.5, 0.5],
            bytes_per_round=1_000,
            seconds=5,
            rng=rng,
        )
    return root


def test_costs_to_fedits_final_score_and_verdicts(planted):
    rows = {r["claim"]: r for r in composite_claims(load_systems(planted))}
    # FedIT needs 5 rounds, SmartFed 2: 2.5x in rounds and in seconds (equal seconds per round)
    assert rows["rounds"]["point"] == pytest.approx(2.5)
    assert rows["train_seconds"]["point"] == pytest.approx(2.5)
    assert rows["bytes"]["point"] == pytest.approx(5 * 40_000 / (2 * 1_000))  # 100x
    assert rows["bytes"]["verdict"] == "holds"  # significant and reaches 31.47x
    assert rows["rounds"]["verdict"] == "partly"  # significant but short of 3.95x
    assert rows["accuracy"]["point"] == pytest.approx((0.65 - 0.5) / 0.5)  # best baseline: fedit
    assert "fedit" in rows["accuracy"]["measured"]
    assert rows["accuracy"]["low"] < rows["accuracy"]["point"] < rows["accuracy"]["high"]
    assert rows["accuracy"]["verdict"] == "holds"
    assert rows["data10"]["point"] == pytest.approx(0.0, abs=1e-9)
    assert rows["data10"]["verdict"] == "does not hold"  # equal is not beating


def test_a_system_that_never_reaches_the_target_has_ratio_zero(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "c"
    _write_run(root / "fedit" / "seed0", 0, [0.2, 0.6], bytes_per_round=10, seconds=1, rng=rng)
    _write_run(root / "smartfed" / "seed0", 0, [0.3, 0.4], bytes_per_round=1, seconds=1, rng=rng)
    rows = {r["claim"]: r for r in composite_claims(load_systems(root))}
    assert rows["bytes"]["point"] == 0.0 and rows["bytes"]["verdict"] == "does not hold"
    assert rows["accuracy"]["point"] < 0 and rows["accuracy"]["verdict"] == "does not hold"


def test_verdict_rules():
    assert verdict(1.2, 5.0, null=1.0, paper=3.95) == "holds"
    assert verdict(1.2, 3.0, null=1.0, paper=3.95) == "partly"
    assert verdict(0.9, 5.0, null=1.0, paper=3.95) == "does not hold"
    assert verdict(-0.01, 0.2, null=0.0, paper=None) == "does not hold"


def test_unpaired_seeds_and_missing_items_are_errors(planted, tmp_path):
    import shutil

    shutil.rmtree(planted / "merge" / "seed2")
    with pytest.raises(ValueError, match=r"do not share their seeds"):
        composite_claims(load_systems(planted))
    bare = tmp_path / "bare" / "fedit" / "seed0"
    bare.mkdir(parents=True)
    (bare / "config.json").write_text("{}")
    (bare / "metrics.jsonl").write_text(json.dumps({"round": 1, "eval_score": 0.5}) + "\n")
    (bare / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no evaluated round with per-item scores"):
        load_systems(tmp_path / "bare")


def test_main_writes_the_table(planted, tmp_path, capsys):
    main([str(planted.parent), "--output", str(tmp_path / "out")])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "31.47× less communication" in table and "json_math" in table
    assert json.loads((tmp_path / "out" / "claims.json").read_text())["json_math"][0]["claim"] == "accuracy"
