"""On a CUDA GPU: MoRE in bfloat16 against float32, the fused layer against the reference, a federation whose
two clients share the GPU, FedIT on the GPU, MoRE over a 4-bit base.

Every test is marked ``gpu`` and skipped without CUDA (so ``pytest tests/test_gpu.py`` collects and
skips on a CPU machine); ``scripts/gpu_check.sh`` runs them with ``pytest -m gpu``. The models are
the tiny random ones of the CPU tests (nothing is downloaded). The CPU side of the same options
(resolution rules, errors, bf16 and 4-bit on the CPU) is ``tests/test_device.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from smartfed.more import LoraPool, MoreConfig, attach_more

from .conftest import make_adapter, run_in_process, tiny_run_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]
CUDA = torch.device("cuda")


def _more(base: torch.nn.Module, pool: LoraPool, top_k: int, router: str = "rank"):
    """MoRE over ``base`` (already on its device and in its dtype) with a seeded router start."""
    return attach_more(base, pool, MoreConfig(top_k=top_k, router=router), generator=torch.Generator().manual_seed(0))


def _forward_backward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 logits, float32 loss, every trainable gradient flattened into one float32 vector)."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad.detach().float().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad]
    return out.logits.detach().float(), out.loss.detach().float(), torch.cat(grads)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# K = 6 keeps all of the 6 experts (no choice to flip: a tight comparison); K = 3 routes, and a near tie of two
# router logits may pick another expert for a token in bf16, so only the loss and the gradient's direction are held.
@pytest.mark.parametrize("top_k", [6, 3])
def test_more_in_bfloat16_matches_float32(
    llama: Callable[[], LlamaForCausalLM], two_adapters: tuple[Path, Path], input_ids: torch.Tensor, top_k: int
) -> None:
    pool = LoraPool.load(list(two_adapters))
    fp32 = _more(llama().to(CUDA), pool, top_k)
    bf16 = _more(llama().to(CUDA, torch.bfloat16), pool, top_k)
    layer = bf16.more_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.dtype is torch.bfloat16 and layer.router.weight.dtype is torch.float32  # routers stay fp32
    x = torch.zeros(1, layer.lora_A.shape[1], device=CUDA, dtype=torch.bfloat16)
    assert layer._base_is_fusable(x)  # the bf16 layer runs the fused RoutedLinear node on the GPU
    ids = input_ids.to(CUDA)
    logits32, loss32, grads32 = _forward_backward(fp32, ids)
    logits16, loss16, grads16 = _forward_backward(bf16, ids)
    assert torch.isfinite(logits16).all() and torch.isfinite(grads16).all()
    assert all(p.grad.dtype is torch.float32 for p in bf16.trainable_parameters())
    assert abs(float(loss16 - loss32)) / float(loss32) < (1e-2 if top_k == 6 else 2e-2)
    if top_k == 6:
        assert _relative(logits16, logits32) < 3e-2
        assert _cosine(grads16, grads32) > 0.99 and _relative(grads16, grads32) < 0.1
    else:
        assert _cosine(grads16, grads32) > 0.95


def test_fused_layer_matches_the_reference_in_bfloat16(
    llama: Callable[[], LlamaForCausalLM], two_adapters: tuple[Path, Path], input_ids: torch.Tensor
) -> None:
    """RoutedLinear (one autograd node, in-place adds) against the plain-autograd layer, both bf16 on the GPU."""
    pool = LoraPool.load(list(two_adapters))
    fused = _more(llama().to(CUDA, torch.bfloat16), pool, 3)
    reference = copy.deepcopy(fused)
    for layer in reference.more_layers().values():
        layer.use_fused = False
    ids = input_ids.to(CUDA)
    logits_f, loss_f, grads_f = _forward_backward(fused, ids)
    logits_r, loss_r, grads_r = _forward_backward(reference, ids)
    # the same gates (same router, same inputs): only bf16 rounding in another order differs
    assert _relative(logits_f, logits_r) < 2e-2 and abs(float(loss_f - loss_r)) < 1e-2 * float(loss_r)
    assert _cosine(grads_f, grads_r) > 0.99


def test_two_clients_share_one_gpu_for_two_rounds(run_assets: dict[str, str], tmp_path: Path) -> None:
    """Flower's simulation engine with client_gpus 0.5: Ray places both clients on the one GPU at once."""
    from smartfed.fl.simulation import run_simulation

    out = tmp_path / "cuda_run"
    config = tiny_run_config(
        run_assets,
        out,
        "smartfed",
        device="cuda",
        dtype="bfloat16",
        client_gpus=0.5,
        topk_experts=4,
        num_clients=2,
        sample_clients=2,
        num_rounds=2,
    )
    run_simulation(config, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_replied"] == 2 and math.isfinite(r["train_loss"]) for r in rows), rows
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    saved = json.loads((out / "config.json").read_text())
    assert (saved["device"], saved["dtype"], saved["client_gpus"]) == ("cuda", "bfloat16", 0.5)
    router = load_file(out / "checkpoints" / "round_0002.safetensors")  # written from the GPU: CPU, float32, finite
    routers = {k: v for k, v in router.items() if ".router." in k}
    assert routers and all(v.dtype is torch.float32 and torch.isfinite(v).all() for v in routers.values())


def test_fedit_trains_on_the_gpu_in_bfloat16(run_assets: dict[str, str], tmp_path: Path) -> None:
    """The LoRA baseline on the same device and dtype (the server loop in-process, no Ray): float32 A and B."""
    from smartfed.fl.runtime import build_runtime

    config = tiny_run_config(run_assets, tmp_path / "fedit", "fedit", device="cuda", dtype="bfloat16")
    runtime = build_runtime(config)
    trained = [p for p in runtime.model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32} and {p.device.type for p in trained} == {"cuda"}
    run_in_process(config)
    rows = [json.loads(line) for line in (tmp_path / "fedit" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == config.num_rounds and all(math.isfinite(r["train_loss"]) for r in rows)


@pytest.fixture(scope="module")
def wide_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama of hidden size 64 (bitsandbytes quantises in blocks of 64) with the char tokenizer, two adapters."""
    from smartfed.data import char_tokenizer

    root = tmp_path_factory.mktemp("wide_gpu")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    pool = [make_adapter(model, root / name, r=4, alpha=8, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    return {"model": str(root / "model"), "pool": ",".join(map(str, pool))}


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_more_over_a_4bit_base_on_the_gpu(wide_assets: dict[str, str]) -> None:
    """NF4 base on the GPU: the base runs as a module, the routed part as one node; float32 routers learn."""
    import bitsandbytes as bnb

    from smartfed.models import is_quantised, load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(wide_assets["model"], device="cuda", dtype="bfloat16", load_in_4bit=True)
    assert is_quantised(base) and isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    reference, _ = load_model_and_tokenizer(wide_assets["model"], device="cuda", dtype="bfloat16")
    pool = LoraPool.load(wide_assets["pool"].split(","))
    more = _more(base, pool, 4)
    layer = more.more_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.device.type == "cuda" and layer.router.weight.dtype is torch.float32
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1)).to(CUDA)
    # trained before any no-grad forward: on the CPU, bitsandbytes repacks a 4-bit weight for its inference
    # kernel (which has no backward) at the first eval-mode no-grad call, after which no gradient crosses it
    start = more.router_state_dict()
    before = {n: p.detach().clone() for n, p in more.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(more.trainable_parameters(), lr=1e-2)
    loss = more(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = dict(more.named_parameters())
    assert all(after[n].grad is not None and after[n].grad.dtype is torch.float32 for n in before)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every router moved
    more.load_router_state_dict(start)  # back to the seeded start, which the bf16 MoRE below also has
    with torch.no_grad():  # the experts' update rides on the 4-bit base: nearer MoRE over bf16 than the bare base
        quantised = more(input_ids=ids).logits.float()
        over_bf16 = _more(copy.deepcopy(reference), pool, 4)(input_ids=ids).logits.float()
        bare = reference(input_ids=ids).logits.float()
    assert (quantised - over_bf16).abs().mean() < (over_bf16 - bare).abs().mean()


def test_benchmark_memory_reads_the_cuda_allocator() -> None:
    """The benchmarks' peak memory on CUDA: a 16 MiB tensor made inside the call is seen."""
    from smartfed.benchmark.hardware import parse_device, peak_during

    device = parse_device("cuda")
    assert device.index is not None
    peak = peak_during(lambda: torch.empty(4 << 20, device=device).fill_(1.0).sum(), device)
    assert peak >= 16 << 20
