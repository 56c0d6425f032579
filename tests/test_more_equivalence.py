"""MoRE reproduces PEFT exactly where the maths says it must (DESIGN.md §1)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch.testing import assert_close

from smartfed import LoraPool, MoreConfig, attach_more

from .conftest import make_adapter, tiny_gpt2, tiny_llama


def _force_onto_adapter(more_model, pool: LoraPool, adapter: str) -> None:
    """Router weight 0 and a large bias on the adapter's ranks; K = its rank per matrix."""
    quotas = {}
    with torch.no_grad():
        for name, layer in more_model.more_layers().items():
            index = pool.adapter_experts(name, adapter)
            layer.router.weight.zero_()
            layer.router.bias.zero_()
            layer.router.bias[index] = 10.0
            quotas[name] = len(index)
    more_model.set_quotas(quotas)


def _peft_logits(base, adapter_dir, input_ids):
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return peft_model(input_ids).logits


@pytest.mark.parametrize("router", ["linear", "rank"])
@pytest.mark.parametrize("which", [0, 1])
def test_one_hot_router_equals_peft_adapter(llama, two_adapters, input_ids, router, which):
    pool = LoraPool.load(two_adapters)
    more_model = attach_more(llama(), pool, MoreConfig(top_k=2, router=router))
    _force_onto_adapter(more_model, pool, pool.adapters[which].name)
    with torch.no_grad():
        ours = more_model(input_ids).logits
    expected = _peft_logits(llama(), two_adapters[which], input_ids)
    assert not torch.allclose(expected, _peft_logits(llama(), two_adapters[1 - which], input_ids))
    assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["linear", "rank"])
def test_dense_zero_router_equals_sum_of_adapters(llama, tmp_path, input_ids, router):
    """K = M, zero router, scaled softmax == PEFT add_weighted_adapter with weights 1.

    PEFT's "cat" combination is the exact sum of the adapters' updates; its
    "linear" one mixes A and B separately (cross terms), so only "cat" is the sum.
    Different ranks, alphas, rsLoRA and target modules are all in the mix.
    """
    base = tiny_llama(seed=0)
    paths = [
        make_adapter(base, tmp_path / "a", r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=1),
        make_adapter(base, tmp_path / "b", r=2, alpha=16, target_modules=("v_proj", "o_proj"), seed=2, use_rslora=True),
        make_adapter(base, tmp_path / "c", r=3, alpha=3, target_modules=("gate_proj",), seed=3),
    ]
    pool = LoraPool.load(paths)
    more_model = attach_more(llama(), pool, MoreConfig(top_k=None, router=router, router_init="zeros"))
    with torch.no_grad():
        ours = more_model(input_ids).logits

    peft_model = PeftModel.from_pretrained(llama(), paths[0], adapter_name="a")
    for p in paths[1:]:
        peft_model.load_adapter(p, adapter_name=p.name)
    names = [p.name for p in paths]
    peft_model.add_weighted_adapter(names, [1.0] * len(names), "sum", combination_type="cat")
    peft_model.set_adapter("sum")
    with torch.no_grad():
        expected = peft_model.eval()(input_ids).logits
    assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_untargeted_matrices_are_untouched(llama, two_adapters):
    more_model = attach_more(llama(), LoraPool.load(two_adapters), MoreConfig(top_k=2))
    reference = llama()
    k_proj = more_model.base_model.model.layers[0].self_attn.k_proj
    assert type(k_proj) is torch.nn.Linear
    assert torch.equal(k_proj.weight, reference.model.layers[0].self_attn.k_proj.weight)
    assert set(more_model.more_layers()) == {
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    }


def test_gpt2_conv1d_one_hot_equals_peft(tmp_path, input_ids):
    base = tiny_gpt2()
    path = make_adapter(base, tmp_path / "gpt2", r=4, alpha=8, target_modules=("c_attn",), fan_in_fan_out=True)
    pool = LoraPool.load([path])
    more_model = attach_more(copy.deepcopy(base), pool, MoreConfig(top_k=None, router_init="zeros"))
    with torch.no_grad():
        ours = more_model(input_ids).logits
        plain = base(input_ids).logits
    expected = _peft_logits(copy.deepcopy(base), path, input_ids)
    assert not torch.allclose(plain, expected)
    assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_generate_works(llama, two_adapters, input_ids):
    more_model = attach_more(
        llama(),
        LoraPool.load(two_adapters),
        MoreConfig(top_k=3, router_init="normal"),
        generator=torch.Generator().manual_seed(0),
    )
    out = more_model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7 + 4)
    assert torch.equal(out[:, :7], input_ids)


def test_bfloat16_base_keeps_float32_router(llama, two_adapters, input_ids):
    model = llama().to(torch.bfloat16)
    more_model = attach_more(model, LoraPool.load(two_adapters), MoreConfig(top_k=2))
    layer = next(iter(more_model.more_layers().values()))
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer.router.weight.dtype == torch.float32
    logits = more_model(input_ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
