"""The fused MoRE layer equals its plain-autograd reference: outputs, gradients, statistics.

Two fused paths: ``RoutedLinear`` (the whole layer as one node, for a frozen
``nn.Linear`` base) and ``RoutedRankSpace`` (the routed part only, for any other
base: here a transformers ``Conv1D``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

from smartfed import LoraPool, MoreConfig, attach_more
from smartfed.more.layer import MoreLinear
from smartfed.more.pool import PoolModule

D_IN, D_OUT, M = 24, 20, 12


def _base(kind: str, gen: torch.Generator) -> torch.nn.Module:
    if kind == "linear":
        return torch.nn.Linear(D_IN, D_OUT)
    conv = Conv1D(D_OUT, D_IN)  # GPT-2 style, weight (d_in, d_out)
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.2, generator=gen)
        conv.bias.normal_(0.0, 0.2, generator=gen)
    return conv


def _layer(
    router: str, gate: str, top_k: int, bias: bool, dtype: torch.dtype = torch.float32, base: str = "linear"
) -> MoreLinear:
    gen = torch.Generator().manual_seed(0)
    base = _base(base, gen).to(dtype).requires_grad_(False)
    experts = PoolModule(
        name="proj",
        A=torch.randn(M, D_IN, generator=gen) / D_IN**0.5,  # (M, d_in)
        B=torch.randn(D_OUT, M, generator=gen) / M**0.5,  # (d_out, M)
        scale=torch.rand(M, generator=gen) + 0.5,  # (M,) unequal scales, as with mixed ranks and alphas
        adapter_index=torch.zeros(M, dtype=torch.long),
        rank_index=torch.arange(M),
    )
    kind, _, raw = router.partition("_")  # "rank_raw": the rank router on A x itself
    config = MoreConfig(
        top_k=top_k,
        router=kind,
        rank_input="raw" if raw else "matched",
        gate=gate,
        router_bias=bias,
        router_init="normal",
        router_init_std=0.5,
    )
    layer = MoreLinear(base, experts, config, top_k=top_k, generator=gen)
    if bias:
        with torch.no_grad():
            layer.router.bias.normal_(0.0, 0.5, generator=gen)
    return layer


def _run(layer: MoreLinear, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, ...]:
    """Output, and the gradients of x and of every router parameter, for one path."""
    layer.use_fused = fused
    x = x.detach().clone().requires_grad_(True)
    for p in layer.router.parameters():
        p.grad = None
    out = layer(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    (out.float() * target).sum().backward()
    return (out.detach(), x.grad, *(p.grad for p in layer.router.parameters()))


@pytest.mark.parametrize("base", ["linear", "conv1d"])
@pytest.mark.parametrize(
    ("router", "gate", "top_k", "bias"),
    [
        *itertools.product(["linear", "rank"], ["scaled_softmax", "softmax", "sigmoid"], [1, 5, M], [True]),
        ("linear", "scaled_softmax", 5, False),
        ("rank", "sigmoid", 5, False),
        ("rank_raw", "scaled_softmax", 5, True),
        ("rank_raw", "sigmoid", 1, False),
    ],
)
def test_fused_equals_reference(router, gate, top_k, bias, base):
    layer = _layer(router, gate, top_k, bias, base=base)
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(1))
    assert layer._base_is_fusable(x) == (base == "linear")  # RoutedLinear for nn.Linear, RoutedRankSpace else
    fused, reference = _run(layer, x, True), _run(layer, x, False)
    assert len(fused) == len(reference) == (4 if bias else 3)
    for got, expected in zip(fused, reference, strict=True):  # same maths, ops fused in another order
        assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if top_k > 1 or gate == "sigmoid":  # a softmax over one kept expert is constant: no gradient to compare
        assert layer.router.weight.grad.abs().sum() > 0


def test_fused_bfloat16_experts_float32_router():
    layer = _layer("rank", "scaled_softmax", 5, True, dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.float32
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    fused, reference = _run(layer, x, True), _run(layer, x, False)
    assert fused[0].dtype == torch.bfloat16 and fused[2].dtype == torch.float32
    for got, expected in zip(fused, reference, strict=True):
        assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_base_not_fused_when_hooked_trainable_or_autocast():
    """Whatever must see the base run as a module keeps it a module: the path changes, the output does not."""
    layer = _layer("linear", "scaled_softmax", 5, True)
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(1))
    expected = layer(x).detach()
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *_: calls.append(1))
    assert not layer._base_is_fusable(x)
    assert_close(layer(x).detach(), expected)
    assert calls == [1]
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert not layer._base_is_fusable(x)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None  # W0 trained as the user asked
    layer.base_layer.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._base_is_fusable(x)
        out = layer(x)
        out.float().sum().backward()
    assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    assert layer._base_is_fusable(x)


@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_input_without_grad_still_trains_the_router(base):
    """As in the first decoder layer: x does not require grad, the router still gets its gradient."""
    layer = _layer("rank", "scaled_softmax", 5, True, base=base)
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (True, False):
        layer.use_fused = fused
        layer.router.zero_grad(set_to_none=True)
        layer(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in layer.router.parameters()])
    for got, expected in zip(*grads, strict=True):
        assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_fused_statistics_equal_reference(base):
    layer = _layer("linear", "scaled_softmax", 5, True, base=base)
    x = torch.randn(2, 6, D_IN, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    stats = []
    for fused in (True, False):
        layer.use_fused = fused
        layer.reset_stats()
        layer.track_stats, layer.stat_token_mask = True, mask
        with torch.no_grad():
            layer(x)
        layer.stat_token_mask = None
        with torch.no_grad():
            layer(x)  # and without a mask
        stats.append(layer.stats())
    assert stats[0]["tokens"] == stats[1]["tokens"] == 10 + 12
    for key in layer.STAT_SUMS:
        assert_close(stats[0][key], stats[1][key])


@pytest.mark.parametrize("router", ["linear", "rank"])
def test_model_router_gradients_equal_reference(llama, two_adapters, input_ids, router):
    """A whole tiny Llama: loss and every router gradient, fused vs reference layers."""
    more_model = attach_more(
        llama(), LoraPool.load(two_adapters), MoreConfig(top_k=3, router=router, router_init="normal"),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    results = []
    for fused in (True, False):
        for layer in more_model.more_layers().values():
            layer.use_fused = fused
        more_model.zero_grad(set_to_none=True)
        with more_model.tracking_expert_stats():
            loss = more_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in more_model.trainable_parameters()]
        results.append((loss.detach(), grads, more_model.expert_stats()))
    (loss_f, grads_f, stats_f), (loss_r, grads_r, stats_r) = results
    assert_close(loss_f, loss_r)
    for got, expected in zip(grads_f, grads_r, strict=True):
        assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for name in stats_f:
        for key in ("contribution", "prob_contribution", "gated_contribution"):
            assert_close(stats_f[name][key], stats_r[name][key])


def test_experts_share_the_pools_storage(llama, two_adapters):
    pool = LoraPool.load(two_adapters)
    more_model = attach_more(llama(), pool, MoreConfig(top_k=2))
    for name, layer in more_model.more_layers().items():
        assert layer.lora_A.data_ptr() == pool.modules[name].A.data_ptr()
        assert layer.expert_B.data_ptr() == pool.modules[name].B.data_ptr()
        assert_close(layer.lora_B, pool.modules[name].B * pool.modules[name].scale)
