"""Export of a routed MoRE model to a static PEFT LoRA adapter: exactness, best rank-R truncation, the command."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import smartfed
from smartfed.cli import app
from smartfed.data import load_task
from smartfed.eval import evaluate_task
from smartfed.more import LoraPool, MoreConfig, attach_more
from smartfed.serving.export import REPORT_FILE, calibration_batches, export_peft, low_rank_factors, mean_gates

from .conftest import tiny_llama
from .test_inference import finished_run


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> dict[str, Any]:
    return finished_run(tmp_path_factory)


def _batches(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(3, 64, (1, 6 + i), generator=g)} for i in range(n)]


def _delta(weights: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    prefix = f"base_model.model.{module}"
    return weights[f"{prefix}.lora_B.weight"] @ weights[f"{prefix}.lora_A.weight"]


@pytest.mark.parametrize("rank", [1, 2, 3, 5, 6])
def test_low_rank_factors_are_the_best_rank_r_approximation(rank):
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 6, generator=g), torch.randn(6, 30, generator=g)
    dense = B.double() @ A.double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    lr = low_rank_factors(B, A, rank)
    assert lr.B.shape == (20, rank) and lr.A.shape == (rank, 30) and lr.B.dtype == torch.float32
    torch.testing.assert_close((lr.B.double() @ lr.A.double()), best, atol=1e-5, rtol=0)
    torch.testing.assert_close(lr.singular_values.double(), s[:6], atol=1e-5, rtol=1e-5)  # rank(B A) <= 6
    assert s[6:].abs().max() < 1e-10
    expected_error = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
    assert lr.rel_error == pytest.approx(expected_error, abs=1e-9)
    # √S in both factors: they carry the same singular values
    torch.testing.assert_close(lr.B.norm(dim=0), lr.A.norm(dim=1), atol=1e-5, rtol=1e-5)


def test_rank_above_the_expert_count_is_zero_padded_and_exact():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(8, 3, generator=g), torch.randn(3, 5, generator=g)
    lr = low_rank_factors(B, A, 7)
    assert lr.rank == 7 and lr.rel_error == 0.0 and torch.all(lr.A[5:] == 0) and torch.all(lr.B[:, 5:] == 0)
    torch.testing.assert_close(lr.B @ lr.A, B @ A, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rank=0"):
        low_rank_factors(B, A, 0)


def test_equal_gates_and_full_rank_reproduce_the_sum_of_adapters(two_adapters, tmp_path):
    # zero router, K = M, scaled softmax: every gate is 1, ΔW = Σ_n s_n B_n A_n
    config = MoreConfig(top_k=None, router_init="zeros")
    more = attach_more(tiny_llama(), LoraPool.load(two_adapters), config).eval()
    gates = mean_gates(more, _batches())
    for g in gates.values():
        torch.testing.assert_close(g, torch.ones(6), rtol=0, atol=0)
    report = export_peft(more, tmp_path / "export", rank=6, gates=gates)
    assert report.max_rel_error < 1e-6 and all(m.mixture_rank == 6 for m in report.matrices)
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and sorted(config["target_modules"]) == sorted(more.quotas())

    exported = PeftModel.from_pretrained(tiny_llama(), tmp_path / "export").eval()
    reference = PeftModel.from_pretrained(tiny_llama(), two_adapters[0], adapter_name="math")
    reference.load_adapter(two_adapters[1], adapter_name="json")
    reference.add_weighted_adapter(["math", "json"], [1.0, 1.0], "sum", combination_type="cat")
    reference.set_adapter("sum")
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = exported(ids).logits
        torch.testing.assert_close(out, more(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out, reference.eval()(ids).logits, atol=1e-5, rtol=0)


def test_truncated_export_is_the_svd_of_the_gate_weighted_mixture(two_adapters, tmp_path):
    more = attach_more(
        tiny_llama(),
        LoraPool.load(two_adapters),
        MoreConfig(top_k=3, router_init="normal", router_init_std=0.5),
        generator=torch.Generator().manual_seed(0),
    ).eval()
    gates = mean_gates(more, _batches())
    assert any(not torch.allclose(g, g[0].expand_as(g)) for g in gates.values())  # the gates differ
    export_peft(more, tmp_path / "r2", rank=2, gates=gates)
    weights = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    for name, layer in more.more_layers().items():
        dense = (layer.lora_B.double() * gates[name].double()) @ layer.lora_A.double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        torch.testing.assert_close(_delta(weights, name).double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=0)


def test_existing_output_is_refused_unless_overwrite(two_adapters, tmp_path):
    more = attach_more(tiny_llama(), LoraPool.load(two_adapters), MoreConfig(top_k=None)).eval()
    gates = {name: torch.ones(6) for name in more.quotas()}
    out = tmp_path / "exports" / "out"
    export_peft(more, out, rank=2, gates=gates)
    with pytest.raises(FileExistsError, match="out"):
        export_peft(more, out, rank=2, gates=gates)
    export_peft(more, out, rank=3, gates=gates, overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary folder left behind


def test_calibration_batches_are_unpadded(fed):
    from smartfed.serving.inference import load

    loaded = load(fed["run"])
    batches = list(calibration_batches(loaded.tokenizer, ["1+2=", "10*12="], ["3", "120"]))
    assert [b["input_ids"].shape[1] for b in batches] == [1 + 4 + 1 + 1, 1 + 6 + 3 + 1]  # bos, prompt, answer, eos
    assert all(b["attention_mask"].all() for b in batches)


def test_export_command_writes_a_peft_adapter_and_scores_both(fed, tmp_path):
    out = tmp_path / "adapter"
    args = [
        "export",
        str(fed["run"]),
        "--to",
        "peft",
        "--rank",
        "4",
        "--output",
        str(out),
        "--calibration",
        "8",
        "--limit",
        "4",
    ]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "routed MoRE" in result.output and "static PEFT LoRA r=4" in result.output
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["rank"] == 4 and report["round"] == 2 and report["calibration_examples"] == 8
    assert {"routed", "export", "base"} <= set(report["scores"])
    assert all(s["n"] == 4 and s["metric"] == "numeric" for s in report["scores"].values())
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fed["model"]), out).eval()
    # each score is its own model's, on the run's first 4 held-out items (models loaded here, not by the command)
    c = fed["config"]
    task, _, test = load_task(c.task, seed=c.seed, num_train=c.num_train, num_test=c.num_test)
    routed, tokenizer = smartfed.load(fed["run"])
    with exported.disable_adapter():
        base = evaluate_task(exported, tokenizer, task, test, max_new_tokens=c.max_new_tokens, limit=4)
    for name, model in (("routed", routed), ("export", exported)):
        want = evaluate_task(model, tokenizer, task, test, max_new_tokens=c.max_new_tokens, limit=4)
        assert report["scores"][name]["score"] == pytest.approx(want["score"]), name
    assert report["scores"]["base"]["score"] == pytest.approx(base["score"])
    assert sum("lora_A" in name for name, _ in exported.named_parameters()) == 4  # q, v in 2 layers
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(app, [*args[:3], "gguf", *args[4:], "--overwrite"])
    assert bad.exit_code == 2 and "peft" in bad.output
