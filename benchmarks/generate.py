"""Generation speed: the routed MoRE model against the base model and the base with one merged LoRA.

A Llama with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 layers, 9
heads, 3 KV heads, vocab 49152, tied embeddings; random weights; ``--shape llama2-7b``:
2 of Llama-2-7B's 32 layers, hidden 4096, intermediate 11008, 32 heads), a pool of two
random PEFT LoRA adapters (rank 32, α 64, on q_proj and v_proj, made and saved
with PEFT in a temporary folder) and three variants of the same weights:

* ``base``   — the model alone;
* ``merged`` — the base with one pool adapter merged in (PEFT ``merge_and_unload``):
  what a static LoRA costs at inference (the same as the base);
* ``routed`` — MoRE over the pool (M = 64 experts per matrix, top-K = 32).

Greedy decoding of exactly ``--new_tokens`` tokens (``min_new_tokens =
max_new_tokens``, so a random model cannot stop early) after a random prompt of
``--prompt_len`` tokens, at batch 1 and 8. The variants are timed side by side in
one run: after a warm-up their repeats are interleaved (in a rotating order)
and medians are reported. tokens/s counts new tokens (batch × new_tokens) over
the whole ``generate`` call (prefill included); ms/step is one decoding step,
``(t(new_tokens) − t(1)) / (new_tokens − 1)``, from a 1-token ``generate`` timed
alongside.

    .venv/bin/python benchmarks/generate.py            # 30 layers, 32 new tokens, batch 1 and 8
    .venv/bin/python benchmarks/generate.py --quick    # 4 layers, a few seconds
    .venv/bin/python benchmarks/generate.py --profile  # + where a MoRE matrix spends a decoding step
    .venv/bin/python benchmarks/generate.py --device cuda --dtype bfloat16 --batches 1 8 32
    .venv/bin/python benchmarks/generate.py --device cuda --dtype bfloat16 --shape llama2-7b

``--dtype`` is the models' dtype: the base and the merged model are cast to it after the
merge (done in float32), the routed model's base before MoRE is attached (its routers stay
float32, SmartFed's default ``router_dtype``). On CUDA every timing is bracketed by
``torch.cuda.synchronize``. Memory, per variant and batch: the weights it holds and the
peak of one ``generate`` call above what was in use before it (KV cache, activations): on
CUDA ``torch.cuda.max_memory_allocated``, on CPU the process's RSS sampled every 5 ms (a
lower bound: memory freed by an earlier call is reused without growing the RSS).

Target: routed ≥ 0.8 × merged tokens/s at batch 1 (PASS/MISS). A benchmark, not
a test: it asserts nothing about time and always exits 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from smartfed.benchmark.hardware import (
    SHAPES,
    ModelShape,
    dtype_name,
    llama_config,
    parse_device,
    parse_dtype,
    peak_during,
    process_peak_line,
)
from smartfed.benchmark.hardware import sync as _sync
from smartfed.benchmark.timing import cpu_jiffies as _cpu_jiffies
from smartfed.benchmark.timing import machine_line as machine
from smartfed.benchmark.timing import others_share as _others_share
from smartfed.benchmark.timing import spread as _spread
from smartfed.more import LoraPool, MoreConfig, attach_more

TARGET = 0.8  # routed / merged tokens/s at batch 1
BATCHES = (1, 8)
VARIANTS = ("base", "merged", "routed")


def smollm2_config(layers: int) -> LlamaConfig:
    """SmolLM2-135M's architecture (its config.json), with ``layers`` decoder layers."""
    return model_config(SHAPES["smollm2"], layers)


def model_config(shape: ModelShape, layers: int) -> LlamaConfig:
    """``shape``'s architecture with ``layers`` decoder layers; pad = eos = 2 (what ``generate`` pads with)."""
    return llama_config(shape, layers, pad_token_id=2)


def make_pool(base: nn.Module, folder: Path, *, rank: int = 32, alpha: int = 64, count: int = 2) -> list[Path]:
    """``count`` random PEFT LoRA adapters on q_proj and v_proj, saved with ``save_pretrained``."""
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
        peft_model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.02)
        path = folder / f"adapter_{i}"
        peft_model.save_pretrained(path)
        base = peft_model.unload()
        paths.append(path)
    return paths


def build_variants(
    layers: int,
    top_k: int,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    shape: ModelShape = SHAPES["smollm2"],
) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: Llama-2-7B's layers take seconds each on a CPU
        base = LlamaForCausalLM(model_config(shape, layers)).eval()
    pool_paths = make_pool(base, folder)
    merged = PeftModel.from_pretrained(copy.deepcopy(base), pool_paths[0]).merge_and_unload().eval()
    # the routed base is cast before attach_more, so that the routers keep their own (float32) dtype
    routed_base = copy.deepcopy(base).to(dtype)
    routed = attach_more(routed_base, LoraPool.load(pool_paths), MoreConfig(top_k=top_k)).eval()
    return {"base": base.to(dtype), "merged": merged.to(dtype), "routed": routed.to(device)}


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers a variant holds (per storage: shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def generate_fn(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    mask = torch.ones_like(input_ids)

    def run() -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=2,
            )

    return run


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Row:
    batch: int
    seconds: dict[str, float]  # median generate time of new_tokens
    step_ms: dict[str, float]  # median decoding step
    peak_bytes: dict[str, int]  # one generate call's peak above what was in use before it
    new_tokens: int
    spread: float  # largest interquartile range / median over the variants
    others: float | None

    def tokens_per_s(self, variant: str) -> float:
        return self.batch * self.new_tokens / self.seconds[variant]


def bench_batch(models: dict[str, nn.Module], batch: int, args: argparse.Namespace, device: torch.device) -> Row:
    g = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(3, SHAPES[args.shape].llama["vocab_size"], (batch, args.prompt_len), generator=g).to(
        device
    )
    full = {v: generate_fn(m, input_ids, args.new_tokens) for v, m in models.items()}
    prefill = {v: generate_fn(m, input_ids, 1) for v, m in models.items()}
    for v in models:  # warm-up
        full[v]()
        prefill[v]()
    times: dict[str, list[float]] = {v: [] for v in models}
    steps: dict[str, list[float]] = {v: [] for v in models}
    names = list(models)
    start = _cpu_jiffies()
    for r in range(args.repeats):
        for v in names[r % len(names) :] + names[: r % len(names)]:
            t_full = _timed(full[v], device)
            t_one = _timed(prefill[v], device)
            times[v].append(t_full)
            steps[v].append(1000 * (t_full - t_one) / max(args.new_tokens - 1, 1))
    others = _others_share(start, _cpu_jiffies())
    peaks = {v: peak_during(full[v], device) for v in names}  # after the timings: the sampler never overlaps them
    return Row(
        batch=batch,
        seconds={v: statistics.median(t) for v, t in times.items()},
        step_ms={v: statistics.median(s) for v, s in steps.items()},
        peak_bytes=peaks,
        new_tokens=args.new_tokens,
        spread=max(_spread(t) for t in times.values()),
        others=others,
    )


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        f"{'batch':>5} | {'tokens/s  base':>14} {'merged':>8} {'routed':>8} | {'ms/step  base':>13} {'merged':>8} "
        f"{'routed':>8} | {'routed/merged':>13} | {'spread':>6} {'others':>6}",
    ]
    for row in rows:
        ratio = row.tokens_per_s("routed") / row.tokens_per_s("merged")
        verdict = ("PASS" if ratio >= TARGET else "MISS") if row.batch == 1 else "    "
        others = "n/a" if row.others is None else f"{row.others:.0%}"
        lines.append(
            f"{row.batch:>5} | {row.tokens_per_s('base'):>14.1f} {row.tokens_per_s('merged'):>8.1f} "
            f"{row.tokens_per_s('routed'):>8.1f} | {row.step_ms['base']:>13.1f} {row.step_ms['merged']:>8.1f} "
            f"{row.step_ms['routed']:>8.1f} | {ratio:>8.2f} {verdict} | {row.spread:>6.0%} {others:>6}"
        )
    return "\n".join(lines)


def format_memory(rows: Sequence[Row], models: dict[str, nn.Module], device: torch.device) -> str:
    """Weights held and the peak of one generate call, per variant, and routed over merged."""
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS, sampled every 5 ms"
    weights = {v: resident_bytes(m) for v, m in models.items()}
    lines = [
        "memory, MiB: weights held by each variant (parameters + buffers) | peak of one generate call above what "
        f"was in use before it ({how})",
        f"{'weights':>7} | {'base':>8} {'merged':>8} {'routed':>8} | {'routed/merged':>13}",
        f"{'':>7} | {weights['base'] / 2**20:>8.1f} {weights['merged'] / 2**20:>8.1f} "
        f"{weights['routed'] / 2**20:>8.1f} | {weights['routed'] / max(weights['merged'], 1):>13.3f}",
        f"{'batch':>7} | {'base':>8} {'merged':>8} {'routed':>8} | {'routed/merged':>13}",
    ]
    for row in rows:
        p = row.peak_bytes
        ratio = f"{p['routed'] / p['merged']:.3f}" if p["merged"] > 0 else "n/a"
        lines.append(
            f"{row.batch:>7} | {p['base'] / 2**20:>8.1f} {p['merged'] / 2**20:>8.1f} {p['routed'] / 2**20:>8.1f} | "
            f"{ratio:>13}"
        )
    if device.type == "cuda":
        lines.append(process_peak_line(device))
    return "\n".join(lines)


def _us(fn: Callable[[], object], device: torch.device, iterations: int = 2000) -> float:
    for _ in range(iterations // 10):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iterations * 1e6


def layer_breakdown(model: nn.Module, batch: int, device: torch.device) -> str:
    """Where one MoRE matrix spends a decoding step: its pieces timed alone at the decode shape (batch, 1, d_in)."""
    import torch.nn.functional as F

    from smartfed.more.router import top_k_gates

    layers = model.more_layers()
    name, layer = next(iter(layers.items()))
    d_in = layer.lora_A.shape[1]
    x = torch.randn(batch, 1, d_in, device=device, dtype=layer.lora_A.dtype)
    with torch.inference_mode():
        z = F.linear(x, layer.lora_A)
        logits = layer.router(x, z)
        gates = top_k_gates(logits, layer.top_k, layer.gate)
        h = z * gates
        base_out = layer.base_layer(x)
        delta = F.linear(h, layer.lora_B)
        pieces = {
            "base W0 x (what a merged LoRA costs)": _us(lambda: layer.base_layer(x), device),
            "z = A x (M x d_in)": _us(lambda: F.linear(x, layer.lora_A), device),
            "router logits (Router module call)": _us(lambda: layer.router(x, z), device),
            "top_k_gates (topk, K*softmax, zeros+scatter)": _us(
                lambda: top_k_gates(logits, layer.top_k, layer.gate), device
            ),
            "  of which: logits.topk(K)": _us(lambda: logits.topk(layer.top_k, dim=-1, sorted=False), device),
            "h = z * gates": _us(lambda: z * gates, device),
            "delta = B h (d_out x M)": _us(lambda: F.linear(h, layer.lora_B), device),
            "result + delta": _us(lambda: base_out + delta, device),
        }
        whole = _us(lambda: layer(x), device)
    parts = sum(v for k, v in pieces.items() if not k.startswith("  "))
    lines = [
        f"one MoRE matrix ({name}: d_in {d_in}, M {layer.num_experts}, K {layer.top_k}) at batch {batch}, "
        f"one decoding step, microseconds (x {len(layers)} matrices per step):"
    ]
    for key, value in pieces.items():
        lines.append(f"  {key:<46} {value:8.1f}")
    lines.append(f"  {'rest: module calls, dtype casts, allocations':<46} {whole - parts:8.1f}")
    lines.append(
        f"  {'MoreLinear forward, whole':<46} {whole:8.1f}   -> routing adds "
        f"{(whole - pieces['base W0 x (what a merged LoRA costs)']) * len(layers) / 1000:.1f} ms per step"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="smollm2",
        help="The model whose shapes the random base has: SmolLM2-135M (default) or Llama-2-7B.",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="Decoder layers (default: "
        + ", ".join(f"{s.default_layers} for {name}" for name, s in SHAPES.items())
        + "; SmolLM2-135M has 30, Llama-2-7B 32).",
    )
    parser.add_argument("--new_tokens", type=int, default=32, help="Tokens generated per call (exactly).")
    parser.add_argument("--prompt_len", type=int, default=32, help="Prompt tokens.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per variant and batch size.")
    parser.add_argument("--top_k", type=int, default=32, help="Experts kept per token per matrix (of 64).")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="Batch sizes.")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N.")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="The models' dtype."
    )
    parser.add_argument("--quick", action="store_true", help="4 layers, 8 new tokens, 3 repeats: a smoke run.")
    parser.add_argument(
        "--profile", action="store_true", help="Also time the pieces of one MoRE matrix at the decode shape."
    )
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = SHAPES[args.shape].default_layers
    if args.quick:
        args.layers, args.new_tokens, args.repeats = min(4, args.layers), 8, 3
    if args.new_tokens < 2 or args.layers < 1 or args.repeats < 1:
        parser.error("--new_tokens must be >= 2, --layers and --repeats >= 1")
    if not 1 <= args.top_k <= 64:
        parser.error(f"--top_k must be between 1 and the pool's 64 experts per matrix; got {args.top_k}")
    try:  # a clear message now rather than a CUDA error from inside the first generate
        parse_dtype(args.dtype, parse_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
    )  # PEFT on transformers 5
    hf_logging.disable_progress_bar()
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    shape = SHAPES[args.shape]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smartfed-bench-") as folder:
        models = build_variants(args.layers, args.top_k, Path(folder), device, dtype, shape)
    built = time.perf_counter() - started
    params = sum(p.numel() for p in models["base"].parameters())
    print(f"generate benchmark | {machine(device)} | {sys.platform}")
    print(
        f"Llama with {shape.label} shapes, {args.layers} layers ({params / 1e6:.1f} M parameters, random, "
        f"{dtype_name(dtype)}); "
        f"pool: 2 PEFT LoRAs r=32 on q,v -> 64 experts per matrix, routed top-K {args.top_k}; "
        f"greedy, prompt {args.prompt_len} tokens, exactly {args.new_tokens} new tokens; "
        f"medians of {args.repeats} interleaved repeats (built in {built:.0f} s)"
    )
    rows = []
    for batch in args.batches:
        rows.append(bench_batch(models, batch, args, device))
    print(format_table(rows))
    print(format_memory(rows, models, device))
    one = next((r for r in rows if r.batch == 1), None)
    if one is not None:
        ratio = one.tokens_per_s("routed") / one.tokens_per_s("merged")
        extra = one.step_ms["routed"] - one.step_ms["merged"]
        print(
            f"target: routed >= {TARGET:.1f} x merged-LoRA tokens/s at batch 1: {ratio:.2f} -> "
            f"{'PASS' if ratio >= TARGET else 'MISS'} (routing adds {extra:+.1f} ms per decoding step, "
            f"{extra / len(models['routed'].more_layers()) * 1000:+.0f} us per MoRE matrix)"
        )
    print(
        "spread: interquartile range / median of the noisiest variant; others: CPU share of other processes meanwhile"
    )
    busy = [r.others for r in rows if r.others is not None and r.others > 0.2]
    if busy:
        print(f"warning: other processes used up to {max(busy):.0%} of the CPU meanwhile; rerun on an idle machine")
    if args.profile:
        for batch in args.batches:
            print(layer_breakdown(models["routed"], batch, device))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
