"""One MoRE layer against one PEFT LoRA layer of the same rank: time and memory of forward + backward.

Both wrap the same frozen ``nn.Linear(d, d, bias=False)`` and see the same input
``x (N, d)`` with ``requires_grad=True`` (as inside a network). LoRA trains its A and
B; MoRE (M = 64 rank-one experts, top K) trains only its router. The two variants are
timed side by side in one run: after a warm-up their iterations are interleaved
(A B A B ...) and the median of each is reported.

    .venv/bin/python benchmarks/more_layer.py                # d in {576, 4096}, K in {8, 32, 64}
    .venv/bin/python benchmarks/more_layer.py --quick        # smoke run, a few seconds
    .venv/bin/python benchmarks/more_layer.py --tokens 1024 --repeats 20 --dtype bfloat16
    .venv/bin/python benchmarks/more_layer.py --device cuda --dtype bfloat16 --tokens 8192

d = 576 is SmolLM2-135M's hidden size, d = 4096 Llama-2-7B's (its q_proj and v_proj are
4096 x 4096). ``--dtype`` is the frozen layer's and the input's dtype; LoRA's A and B and
MoRE's router stay float32, as PEFT and SmartFed make them over a bf16 base. On CUDA every
timed step is bracketed by ``torch.cuda.synchronize``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one step, above what
was allocated before it; on CPU, the bytes of the tensors autograd saves for backward
(deduplicated by storage, the module's own parameters and buffers left out).

A benchmark, not a test: it asserts nothing about time and always exits 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from smartfed.benchmark.hardware import DTYPES, parse_device, parse_dtype, peak_during, process_peak_line
from smartfed.benchmark.hardware import sync as _sync
from smartfed.benchmark.timing import cpu_jiffies as _cpu_jiffies
from smartfed.benchmark.timing import machine_line as machine
from smartfed.benchmark.timing import others_share as _others_share
from smartfed.benchmark.timing import spread as _spread
from smartfed.more.config import MoreConfig
from smartfed.more.layer import MoreLinear
from smartfed.more.pool import PoolModule

DIMS = (576, 4096)  # SmolLM2-135M, Llama-2-7B hidden sizes
DEFAULT_TOKENS = {576: 2048, 4096: 512}
EXPERTS = 64
TOP_KS = (8, 32, 64)
ROUTERS = ("linear", "rank")
TARGETS = {"linear": 1.25, "rank": 1.10}  # time ratio MoRE / LoRA


@dataclass
class Row:
    d: int
    tokens: int
    router: str
    top_k: int
    lora_ms: float
    more_ms: float
    lora_bytes: int
    more_bytes: int
    noise: float  # interquartile range / median of the noisier variant
    others: float | None  # share of the machine's CPU other processes used meanwhile (Linux only)

    @property
    def ratio(self) -> float:
        return self.more_ms / self.lora_ms

    @property
    def mem_ratio(self) -> float:
        return self.more_bytes / max(self.lora_bytes, 1)

    @property
    def target(self) -> float:
        return TARGETS[self.router]


class _Holder(nn.Module):
    """The smallest model PEFT can wrap: one Linear named ``proj``."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_base(d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    base = nn.Linear(d, d, bias=False).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    return base


def make_more(base: nn.Linear, m: int, top_k: int, router: str, seed: int = 1) -> MoreLinear:
    d = base.in_features
    gen = torch.Generator().manual_seed(seed)
    pool = PoolModule(
        name="proj",
        A=torch.randn(m, d, generator=gen) / d**0.5,  # (M, d)
        B=torch.randn(d, m, generator=gen) / m**0.5,  # (d, M)
        scale=torch.ones(m),  # (M,)
        adapter_index=torch.zeros(m, dtype=torch.long),  # (M,)
        rank_index=torch.arange(m),  # (M,)
    )
    return MoreLinear(base, pool, MoreConfig(top_k=top_k, router=router), top_k=top_k)


def make_lora(base: nn.Linear, r: int) -> nn.Module:
    """PEFT's lora.Linear around ``base`` (the wrapped layer itself, not the PeftModel shell)."""
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0)
    peft_model = get_peft_model(_Holder(base), config)
    return peft_model.base_model.model.proj


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    """One training step's compute: forward, a scalar loss, backward."""
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    out = layer(x)
    loss = out.float().pow(2).mean()
    loss.backward()


def _timed(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def time_side_by_side(
    lora: Callable[[], None], more: Callable[[], None], device: torch.device, repeats: int, warmup: int
) -> tuple[float, float, float, float | None]:
    """Median ms of each and the larger spread, interleaved so that drift (clocks, other load) hits both alike."""
    for _ in range(warmup):
        lora()
        more()
    lora_ms, more_ms = [], []
    start = _cpu_jiffies()
    for i in range(repeats):
        # Alternate who goes first, so neither always runs on the other's warm cache.
        if i % 2 == 0:
            lora_ms.append(_timed(lora, device))
            more_ms.append(_timed(more, device))
        else:
            more_ms.append(_timed(more, device))
            lora_ms.append(_timed(lora, device))
    others = _others_share(start, _cpu_jiffies())
    return statistics.median(lora_ms), statistics.median(more_ms), max(_spread(lora_ms), _spread(more_ms)), others


def saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward, per storage, weights and buffers excluded."""
    skip = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
        loss = out.float().pow(2).mean()
    loss.backward()
    return sum(seen.values())


def peak_bytes(layer: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    if device.type != "cuda":
        return saved_activation_bytes(layer, x)
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    return peak_during(lambda: _step(layer, x), device)


def bench_one(
    d: int,
    tokens: int,
    router: str,
    top_k: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    experts: int = EXPERTS,
) -> Row:
    base = make_base(d, dtype, device)
    more = make_more(base, experts, top_k, router)
    lora = make_lora(copy.deepcopy(base), experts)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    lora_ms, more_ms, noise, others = time_side_by_side(
        lambda: _step(lora, x), lambda: _step(more, x), device, repeats=repeats, warmup=warmup
    )
    return Row(
        d=d,
        tokens=tokens,
        router=router,
        top_k=top_k,
        lora_ms=lora_ms,
        more_ms=more_ms,
        lora_bytes=peak_bytes(lora, x, device),
        more_bytes=peak_bytes(more, x, device),
        noise=noise,
        others=others,
    )


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def format_table(rows: Sequence[Row], device: torch.device, dtype: torch.dtype, repeats: int) -> str:
    memory = (
        "peak CUDA memory of one step above the memory allocated before it"
        if device.type == "cuda"
        else "activation memory saved for backward (per storage; weights and buffers excluded)"
    )
    lines = [
        "MoRE layer vs PEFT LoRA layer, forward + backward, one frozen nn.Linear(d, d, bias=False)",
        f"machine: {machine(device)}",
        f"dtype {str(dtype).removeprefix('torch.')}, M = LoRA rank = {EXPERTS}, median of {repeats} interleaved steps",
        f"memory: {memory}",
        f"targets: MoRE/LoRA time ratio <= {TARGETS['linear']} (linear router), <= {TARGETS['rank']} (rank router)",
        "",
    ]
    header = (
        f"{'d':>5} {'tokens':>6} {'router':<6} {'K':>3} | {'LoRA ms':>9} {'MoRE ms':>9} {'ratio':>6} {'':4} | "
        f"{'LoRA MiB':>8} {'MoRE MiB':>8} {'ratio':>6} | {'noise':>5} {'others':>6}"
    )
    lines += [header, "-" * len(header)]
    for r in rows:
        verdict = "PASS" if r.ratio <= r.target else "MISS"
        lines.append(
            f"{r.d:>5} {r.tokens:>6} {r.router:<6} {r.top_k:>3} | {r.lora_ms:9.2f} {r.more_ms:9.2f} {r.ratio:6.3f} "
            f"{verdict:4} | {_mib(r.lora_bytes)} {_mib(r.more_bytes)} {r.mem_ratio:6.3f} | {r.noise:5.0%} {_pct(r.others):>6}"
        )
    lines += [
        "",
        "noise: interquartile range / median of the step times (the noisier variant); others: share of the "
        "machine's CPU that other processes used during the timed steps. Others above ~10% (or noise above ~25%): "
        "the machine was busy with something else, rerun before reading the ratio.",
    ]
    if device.type == "cuda":
        lines.append(process_peak_line(device))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens per step, for every d (default: "
        + ", ".join(f"{n} at d={d}" for d, n in DEFAULT_TOKENS.items())
        + ")",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="hidden sizes d")
    parser.add_argument("--top-k", type=int, nargs="+", default=list(TOP_KS), help="experts kept per token")
    parser.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS))
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.tokens, args.top_k, args.repeats, args.warmup = [576], 64, [8, 64], 2, 1
    try:  # a clear message now rather than a CUDA error from inside the first step
        parse_dtype(args.dtype, parse_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    if any(k < 1 or k > EXPERTS for k in args.top_k):
        parser.error(f"--top-k must be between 1 and M = {EXPERTS}; got {args.top_k}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    rows = []
    for d in args.dims:
        tokens = args.tokens or DEFAULT_TOKENS.get(d, 1024)
        for router in args.routers:
            for k in args.top_k:
                rows.append(
                    bench_one(
                        d, tokens, router, k, device=device, dtype=dtype, repeats=args.repeats, warmup=args.warmup
                    )
                )
    print(format_table(rows, device, dtype, args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
