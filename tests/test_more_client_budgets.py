"""A client of budget β keeps ⌊β·top_k⌋ experts, the floor exact for a decimal β (A³SMoE, smartfed_module)."""

from __future__ import annotations

import torch

from smartfed.methods import LocalTrainConfig, get_method_class, load_builtin_methods
from smartfed.methods.a3smoe import client_top_k
from smartfed.more import LoraPool
from smartfed.run.config import RunConfig

from .conftest import make_adapter, tiny_llama

load_builtin_methods()


def test_a3smoe_client_top_k_floors_the_decimal_product():
    """⌊0.29 · 100⌋ = 29: int(0.29 * 100) floors the binary 28.999… to 28."""
    assert int(0.29 * 100) == 28  # the float fault the rule must not inherit
    assert client_top_k(100, 0.29, num_experts=128) == 29
    assert client_top_k(100, 0.57, num_experts=128) == 57  # 0.57 * 100 = 56.99999999999999 as well
    assert client_top_k(100, 0.29, num_experts=20) == 20  # still bounded by the matrix's experts
    assert client_top_k(100, 0.001, num_experts=128) == 1  # and kept at one expert at least


def test_module_level_budget_floors_the_decimal_product(tmp_path):
    """smartfed_module's client budget: ⌊0.29 · 100⌋ = 29 adapters kept, not int(0.29 * 100) = 28."""
    base = tiny_llama(seed=0)
    pool = LoraPool.load([make_adapter(base, tmp_path / name, r=4, alpha=8, seed=i) for i, name in enumerate("ab")])
    config = RunConfig(method="smartfed_module", lora_rank=4, lora_alpha=8.0, topk_experts=2, energy="none")
    method = get_method_class("smartfed_module")(config)
    model = method.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    routers = list(method.gates(model).values())
    for router in routers:
        router.full_top_k = 100  # as if the pool had 100 adapters per matrix
    method.prepare_round(model, {}, {}, LocalTrainConfig(1e-2, budget=0.29))
    assert {r.top_k for r in routers} == {29}
