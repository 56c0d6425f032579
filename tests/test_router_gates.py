"""Gates registered once (forward and closed-form backward), the routing spec, the statistics module."""

from __future__ import annotations

import dataclasses
import inspect
from typing import get_args

import pytest
import torch
from torch.testing import assert_close

from smartfed.more import GATES, STAT_SUMS, ExpertStats, Gate, MoreConfig, MoreLinear, RoutingSpec, top_k_gates
from smartfed.more.config import GateType
from smartfed.more.layer import RoutedLinear, RoutedRankSpace
from smartfed.more.pool import PoolModule
from smartfed.more.router import top_k_gates_backward
from smartfed.more.stats import tracking

M = 7


def test_every_config_gate_is_registered_once():
    assert set(GATES) == set(get_args(GateType))
    assert all(isinstance(g, Gate) for g in GATES.values())


@pytest.mark.parametrize("gate", sorted(GATES))
def test_a_gate_is_callable_as_its_forward(gate):
    kept = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(GATES[gate](kept), GATES[gate].forward(kept))


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("top_k", [1, 3, M, M + 2])
def test_closed_form_backward_equals_autograd(gate, top_k):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, M, generator=gen, dtype=torch.float64).requires_grad_(True)
    upstream = torch.randn(5, M, generator=gen, dtype=torch.float64)  # ∂L/∂gates
    gates = top_k_gates(logits, top_k, gate)
    (gates * upstream).sum().backward()
    u = gates.detach() * upstream
    assert_close(top_k_gates_backward(u, gates.detach(), top_k, gate), logits.grad)


def _layer(top_k: int = 3) -> MoreLinear:
    gen = torch.Generator().manual_seed(0)
    experts = PoolModule(
        name="proj",
        A=torch.randn(M, 6, generator=gen),
        B=torch.randn(5, M, generator=gen),
        scale=torch.ones(M),
        adapter_index=torch.zeros(M, dtype=torch.long),
        rank_index=torch.arange(M),
    )
    base = torch.nn.Linear(6, 5).requires_grad_(False)
    return MoreLinear(base, experts, MoreConfig(top_k=top_k, router="rank", gate="softmax"), top_k=top_k)


def test_routing_spec_is_frozen_and_follows_top_k():
    layer = _layer(top_k=3)
    spec = layer.routing
    assert spec == RoutingSpec(top_k=3, gate="softmax", router_kind="rank", match=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.top_k = 4
    assert spec.with_base_norm.base_norm and spec.with_base_norm is spec.with_base_norm  # made once
    layer.top_k = 5  # what set_quotas does: a new spec, the old one untouched
    assert layer.routing.top_k == layer.top_k == 5 and spec.top_k == 3
    assert layer.gate == "softmax"


@pytest.mark.parametrize("function", [RoutedRankSpace, RoutedLinear])
def test_autograd_functions_take_one_non_tensor_input(function):
    *_, last = inspect.signature(function.forward).parameters.values()
    assert last.name == "spec"
    layer = _layer()
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).sum().backward()  # backward returns one entry per input: it would raise otherwise
    assert x.grad is not None and layer.router.weight.grad is not None


def test_statistics_live_in_their_own_module():
    layer = _layer()
    assert isinstance(layer.statistics, ExpertStats)
    assert layer.STAT_SUMS == ExpertStats.SUMS == STAT_SUMS
    with pytest.raises(RuntimeError), tracking([layer]):
        assert layer.track_stats
        layer(torch.randn(2, 3, 6))
        raise RuntimeError("interrupted")
    assert not layer.track_stats  # reset however the block ends
    means = layer.stats()
    assert means["tokens"] == 6 and set(means) == {*STAT_SUMS, "tokens"}
