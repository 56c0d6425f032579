"""The default benchmark's machinery: intervals, paired comparisons, static systems, one tiny end-to-end run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

from smartfed.benchmark.runner import CompositionConfig, run_composition, static_systems
from smartfed.benchmark.tables import paired_bootstrap, render_markdown, summarise, wilson_interval

from .conftest import save_tiny_assets


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 220)
    assert low == 0.0 and high == pytest.approx(0.01719, abs=1e-4)
    low, high = wilson_interval(110, 220)
    assert low == pytest.approx(0.4341, abs=1e-3) and high == pytest.approx(0.5659, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_paired_bootstrap():
    assert paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0]) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([1.0] * 50, [0.0] * 50) == (1.0, 1.0, 1.0)
    mean, low, high = paired_bootstrap([1.0] * 30 + [0.0] * 70, [0.0] * 100, seed=3)
    assert mean == pytest.approx(0.3) and low < 0.3 < high


def test_summary_and_table_from_synthetic_results():
    results = {
        "config": {"composite": "json_math"},
        "test_items": 4,
        "gates": {"adapter:math on math": 0.5},
        "items": {"base": [0.0, 0.0, 0.0, 0.0], "chance": [0.0, 0.0, 0.0, 1.0]},
        "seeds": {
            "0": {
                "smartfed": {"items": [1.0, 1.0, 0.0, 0.0], "train_score": 0.75},
                "fedit": {"items": [1.0, 0.0, 0.0, 0.0]},
            },
            "1": {
                "smartfed": {"items": [1.0, 1.0, 1.0, 0.0], "train_score": 1.0},
                "fedit": {"items": [0.0, 0.0, 0.0, 0.0]},
            },
        },
    }
    summary = summarise(results)
    assert summary["smartfed"]["per_seed"] == [0.5, 0.75]
    assert summary["smartfed"]["mean"] == pytest.approx(0.625)
    assert summary["smartfed"]["std"] == pytest.approx(0.1767767, abs=1e-6)
    assert summary["base"]["per_seed"] == [0.0, 0.0]  # static systems count once per seed
    assert summary["fedit"]["smartfed_minus"][0] == pytest.approx(0.5)
    assert "smartfed_minus" not in summary["smartfed"]
    results["summary"] = summary
    table = render_markdown(results)
    assert "| smartfed | 0.625 ± 0.177 |" in table and "+0.500" in table and "| 1 | smartfed | 1.000 | 0.750 |" in table


def test_config_validation():
    with pytest.raises(ValueError, match="composite='french_math'"):
        CompositionConfig(composite="french_math")
    with pytest.raises(ValueError, match="seeds='a'"):
        CompositionConfig(seeds="a")
    with pytest.raises(ValueError, match="num_rounds=0"):
        CompositionConfig(num_rounds=0)
    with pytest.raises(ValueError, match="wire_dtype='int8'"):
        CompositionConfig(wire_dtype="int8")


def test_the_demo_passes_its_wire_dtype_to_the_federated_runs(tmp_path):
    from smartfed.benchmark.runner import _run_config

    for wire in ("float32", "bfloat16"):
        run = _run_config(CompositionConfig(wire_dtype=wire), 0, "a,b", "fedit", tmp_path / wire)
        assert run.wire_dtype == wire and run.method == "fedit"


def test_sum_merge_is_both_adapters_at_once(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, a, b = save_tiny_assets(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    systems = static_systems(base, {"math": str(a), "json": str(b)})
    assert set(systems) == {"base", "adapter:math", "adapter:json", "merge:sum", "merge:average"}
    both = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(a), adapter_name="math")
    both.load_adapter(str(b), adapter_name="json")
    both.base_model.set_adapter(["math", "json"])  # PEFT adds the outputs of active adapters
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(systems["merge:sum"](input_ids=ids).logits, both.eval()(input_ids=ids).logits)
        assert not torch.allclose(
            systems["merge:sum"](input_ids=ids).logits, systems["adapter:math"](input_ids=ids).logits
        )
        torch.testing.assert_close(systems["base"](input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    model_dir, a, b = save_tiny_assets(tmp_path / "assets")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name, path in (("math", a), ("json", b)):
        shutil.copytree(path, zoo / name)
    (zoo / "manifest.json").write_text(json.dumps({"adapters": {"math": {}, "json": {}}}))
    config = CompositionConfig(
        model=str(model_dir),
        zoo=str(zoo),
        num_clients=2,
        sample_clients=2,
        num_rounds=1,
        local_steps=1,
        batch_size=4,
        num_train=16,
        num_test=20,
        controls=True,
        out=str(tmp_path / "out"),
    )
    results = run_composition(config)
    summary = results["summary"]
    expected = {"base", "adapter:math", "adapter:json", "merge:sum", "merge:average", "chance", "smartfed", "fedit"}
    assert expected <= set(summary) and "static_gate" in summary
    assert any(k.startswith("continued:") for k in summary)
    assert all(len(v["per_seed"]) == 1 for v in summary.values())
    assert len(results["seeds"]["0"]["smartfed"]["items"]) == 20
    assert results["seeds"]["0"]["smartfed"]["bytes_up_total"] > 0
    assert set(results["gates"]) == {
        f"{s} on {t}" for s in ("base", "merge:sum", "merge:average") for t in ("math", "json_format")
    } | {
        "adapter:math on math",
        "adapter:json on json_format",
    }
    for name in ("results.json", "table.md", "metric_vs_round.png"):
        assert (tmp_path / "out" / name).is_file()
