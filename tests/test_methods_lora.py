"""Knowledge-free baselines (LoRA from scratch): aggregation rules by hand, and 2-round federated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smartfed.data import char_tokenizer, load_task
from smartfed.eval import evaluate_task
from smartfed.fl.run_config import RunConfig
from smartfed.fl.simulation import run_simulation
from smartfed.methods import ClientUpdate, get_method_class, load_builtin_methods
from smartfed.methods.lora_common import client_rank, lora_state

from .conftest import save_tiny_assets, tiny_llama

load_builtin_methods()

A0, B0 = "m.lora_A.weight", "m.lora_B.weight"


def _config(**overrides) -> RunConfig:
    values = dict(lora_rank=4, lora_alpha=8.0, lora_target_modules="q_proj,v_proj", energy="none")
    values.update(overrides)
    return RunConfig(**values)


def _method(name: str, **overrides):
    return get_method_class(name)(_config(method=name, **overrides))


def _update(partition: int, examples: int, **arrays: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(partition=partition, arrays=arrays, num_examples=examples, train_loss=0.0)


# --- shared helpers -------------------------------------------------------------------------------
def test_seeded_build_is_identical_across_processes_and_leaves_the_global_rng_alone():
    method = _method("fedit")
    base = tiny_llama()  # (seeds the global RNG itself)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    one = method.build(base, None, torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3), expected_next)  # PEFT's own init did not consume the global RNG
    two = method.build(tiny_llama(), None, torch.Generator().manual_seed(5))
    other = method.build(tiny_llama(), None, torch.Generator().manual_seed(6))
    s1, s2, s3 = lora_state(one), lora_state(two), lora_state(other)
    assert len(s1) == 8  # q, v in 2 layers, A and B each
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1 if "lora_A" in k)
    assert all(not v.any() for k, v in s1.items() if "lora_B" in k)  # B = 0: the model starts as the base
    assert [p for p in one.parameters() if p.requires_grad] and all(
        "lora_" in n for n, p in one.named_parameters() if p.requires_grad
    )


@pytest.mark.parametrize(("beta", "rank"), [(1.0, 8), (0.5, 4), (0.3, 2), (0.01, 1)])
def test_client_rank(beta, rank):
    assert client_rank(8, beta) == rank


def test_fedit_averages_a_and_b_separately_by_examples():
    updates = [
        _update(0, 1, **{A0: torch.tensor([[1.0, 2.0]]), B0: torch.tensor([[2.0], [0.0]])}),
        _update(1, 3, **{A0: torch.tensor([[5.0, -2.0]]), B0: torch.tensor([[-2.0], [4.0]])}),
    ]
    merged = _method("fedit").aggregate(updates)
    # (1·x0 + 3·x1) / 4 by hand
    torch.testing.assert_close(merged[A0], torch.tensor([[4.0, -1.0]]))
    torch.testing.assert_close(merged[B0], torch.tensor([[-1.0], [3.0]]))


def test_fedit_model_generates_and_evaluates():
    tokenizer = char_tokenizer()
    model = _method("fedit").build(tiny_llama(hidden=32), None, torch.Generator().manual_seed(0))
    task, _, test = load_task("arith", seed=0, num_train=8, num_test=4)
    result = evaluate_task(model, tokenizer, task, test, max_new_tokens=2)
    assert result["n"] == 4 and 0.0 <= result["score"] <= 1.0


# --- 2-round federated runs through the run folder ------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora_assets")
    model_dir, a, b = save_tiny_assets(root)
    return {"model": str(model_dir), "pool": f"{a},{b}"}


def tiny_run_config(assets: dict[str, str], out: Path, method: str, **overrides) -> RunConfig:
    values = dict(
        model_name_or_path=assets["model"],
        lora_pool=assets["pool"],
        method=method,
        task="arith",
        num_clients=3,
        sample_clients=2,
        num_rounds=2,
        local_steps=2,
        batch_size=4,
        learning_rate=1e-2,
        lora_rank=4,
        lora_alpha=8.0,
        num_train=24,
        num_test=4,
        max_length=32,
        max_new_tokens=2,
        energy="none",
        seed=3,
        output_dir=str(out),
    )
    values.update(overrides)
    return RunConfig(**values)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedit_two_round_run(assets, tmp_path):
    out = tmp_path / "fedit"
    run_simulation(tiny_run_config(assets, out, "fedit"), progress=False)
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    final = load_file(out / "checkpoints" / "round_0002.safetensors")
    assert len(final) == 8 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in final)
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # B trained away from 0
    lora_bytes = sum(v.numel() * v.element_size() for v in final.values())
    for row in rows:
        assert row["bytes_up_state"] == 2 * lora_bytes and row["bytes_up_extras"] == 0
        assert row["bytes_down_per_client"] == lora_bytes
        assert row["eval_n"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedit" and summary["rounds"] == 2
