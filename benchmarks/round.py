"""One client's round, SmartFed against FedIT: training-step time, memory and bytes sent up.

Every variant wraps the SAME frozen Llama (SmolLM2-135M's shapes by default, Llama-2-7B's
with ``--shape llama2-7b``; random weights: the parameter tensors are shared, not copied)
and trains on the SAME batch:

- LoRA (FedIT): a fresh PEFT LoRA, rank 32, alpha 64 on q_proj and v_proj
  (``get_peft_model``, dropout 0); it trains and sends A and B.
- SmartFed: ``attach_more`` over a pool of 2 PEFT adapters (alpha 2·rank on q_proj and
  v_proj, random weights, saved to a temporary folder and read back with
  ``LoraPool.load``), top-K = M/2 of the M rank-one experts per matrix; it trains and
  sends only the routers (``router_state_dict``). Each SmartFed variant is timed
  twice, as ``SmartFed.local_train`` runs it: without expert statistics (no EEQA,
  every client at budget 1: nobody reads the importance, so none is computed or
  sent) and with them ("<name> stats": with ``--enable_eeqa`` or client budgets
  the step accumulates the per-expert importance and sends it, M floats per matrix,
  beside the router). By default two pools are measured in the same run: adapters
  of rank 16 (M = 32, the pool's total rank equals the LoRA's: what the router
  itself adds) and of rank 32 (M = 64: twice the LoRA's rank, so twice its low-rank
  matmuls whatever the router costs).

A step is forward + backward + AdamW step (lr 5e-4), as in ``Method.local_train``.
After a warm-up the variants' steps are interleaved (the order rotates every
iteration) and the median of each is reported.

    .venv/bin/python benchmarks/round.py                 # 30 layers, batch 8 x 48 tokens, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/round.py --quick         # smoke run: 2 layers, tiny batch, seconds
    .venv/bin/python benchmarks/round.py --pool-rank 16  # only the pool whose total rank = the LoRA's
    .venv/bin/python benchmarks/round.py --stats off     # only the steps without expert statistics
    .venv/bin/python benchmarks/round.py --layers 4 --repeats 5
    .venv/bin/python benchmarks/round.py --profile       # also: top ops by self CPU time, one step per variant
    .venv/bin/python benchmarks/round.py --device cuda --dtype bfloat16                      # a GPU, bf16 base
    .venv/bin/python benchmarks/round.py --device cuda --dtype bfloat16 --shape llama2-7b    # 2 of Llama-2-7B's layers

``--dtype`` is the frozen base's dtype (and so the experts'); the trainable tensors stay as
each library makes them on such a base: PEFT's LoRA A and B and SmartFed's routers in float32.
On CUDA every step is bracketed by ``torch.cuda.synchronize``, so its wall time covers its kernels.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one step above what was
allocated before it, and at the end the whole process's peak; on CPU (no allocator statistics) the bytes autograd saves for
backward (``saved_tensors_hooks``, deduplicated by storage, parameters and buffers
left out). To either is added what each variant keeps resident beside the shared base
weights: trainable parameters, their gradients, the AdamW state and (SmartFed) the
frozen experts (layer buffers and the pool, deduplicated by storage).

Arithmetic: the "MAC vs LoRA" column is the ratio of the multiply-adds of the low-rank
matmuls per token, forward and backward, from the shapes (``low_rank_macs``): the part
of the step where the variants differ; the frozen base's share is the same for all.

A benchmark, not a test: the targets are printed next to the measurements, never
asserted, and the script always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import LlamaForCausalLM

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
from smartfed.more import LoraPool, MoreConfig, MoreModel, attach_more

# SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M config.json), the default; --shape picks another.
SMOLLM2_135M = SHAPES["smollm2"].llama
RANK, ALPHA = 32, 64
TARGET_MODULES = ("q_proj", "v_proj")
POOL_SIZE = 2
POOL_RANKS = (RANK // POOL_SIZE, RANK)  # total rank = the LoRA's, then twice it
ROUTERS = ("linear", "rank")
LEARNING_RATE = 5e-4
# Targets, SmartFed / LoRA. Time and memory: both pay the frozen base's forward and
# backward, the router must add nothing on top. Uplink: "far below" read as <= 1/4.
TIME_TARGET = 1.0
MEMORY_TARGET = 1.0
UPLINK_TARGET = 0.25
LORA = "LoRA (FedIT)"


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], torch.Tensor]  # returns the detached loss
    router: str | None = None  # None for LoRA
    stats: bool = False  # SmartFed: expert statistics accumulated during the step (EEQA or client budgets)
    experts: int = 0  # SmartFed's M per matrix
    top_k: int = 0
    macs: int = 0  # low-rank multiply-adds per token, forward + backward (low_rank_macs)
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # this process's CPU time (all threads) per step
    loss: float = float("nan")
    memory: dict[str, int] = field(default_factory=dict)
    uplink: dict[str, int] = field(default_factory=dict)
    trainable: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def spread(self) -> float:
        """Interquartile range over median of the timed steps."""
        if len(self.times_ms) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4)
        return (q3 - q1) / self.median_ms

    @property
    def memory_total(self) -> int:
        return sum(self.memory.values())

    @property
    def uplink_total(self) -> int:
        return sum(self.uplink.values())


# --- model, pool, variants ---------------------------------------------------------------
def build_base(
    layers: int,
    device: torch.device,
    seed: int,
    shape: ModelShape = SHAPES["smollm2"],
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A random Llama with ``shape``'s shapes and ``layers`` decoder layers, frozen, in ``dtype`` on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: Llama-2-7B's layers take seconds each on a CPU
        model = LlamaForCausalLM(llama_config(shape, layers))
    model.to(dtype)  # initialised in float32, then cast (as a bf16 checkpoint would have been made)
    model.requires_grad_(False)
    return model


def share(base: nn.Module) -> nn.Module:
    """A copy of ``base``'s modules that shares its parameter and buffer tensors (the SAME weights)."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


def make_adapter(base: nn.Module, path: Path, seed: int, rank: int = RANK) -> Path:
    """A PEFT LoRA adapter (rank ``rank``, alpha 2·rank, q/v) with random A and B, written by save_pretrained."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES), lora_dropout=0.0, init_lora_weights=False
    )
    peft_model = get_peft_model(share(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # small enough that 30 random layers stay finite
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    with warnings.catch_warnings():  # transformers' deprecation notices from inside save_pretrained
        warnings.simplefilter("ignore", FutureWarning)
        peft_model.save_pretrained(path)
    return path


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], around: Callable[[], object]
) -> Callable[[], torch.Tensor]:
    """Method.local_train's step: loss, zero_grad(set_to_none), backward, AdamW step."""

    def step() -> torch.Tensor:
        with around():
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.detach()

    return step


def make_lora(base: nn.Module, batch: dict[str, torch.Tensor]) -> Variant:
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES), lora_dropout=0.0)
    model = get_peft_model(share(base), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    step = _train_step(model, optimizer, batch, contextlib.nullcontext)
    return Variant(LORA, model, optimizer, step, trainable=sum(p.numel() for p in params))


def make_smartfed(
    base: nn.Module,
    pool: LoraPool,
    router: str,
    batch: dict[str, torch.Tensor],
    *,
    stats: bool = True,
    fused: bool = True,
    top_k: int | None = None,
) -> Variant:
    experts = next(iter(pool.modules.values())).num_experts  # M per matrix (the same for all here)
    top_k = experts // 2 if top_k is None else top_k
    model = attach_more(share(base), pool, MoreConfig(top_k=top_k, router=router))
    for layer in model.more_layers().values():
        layer.use_fused = fused  # False: the plain-autograd reference layer (MoreLinear.forward_reference)
    model.train()
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    # stats: expert statistics during every step, as SmartFed.local_train with EEQA or client budgets
    # (reset=False: they add up here).
    around = (lambda: model.tracking_expert_stats(reset=False)) if stats else contextlib.nullcontext
    step = _train_step(model, optimizer, batch, around)
    name = f"SmartFed {router} M={experts}" + ("" if fused else " ref") + (" stats" if stats else "")
    trainable = sum(p.numel() for p in params)
    return Variant(
        name, model, optimizer, step, router=router, stats=stats, experts=experts, top_k=top_k, trainable=trainable
    )


def low_rank_macs(router: str | None, width: int, shapes: Iterable[tuple[int, int]]) -> int:
    """Multiply-adds per token of the low-rank matmuls, forward + backward, over matrices ``(d_in, d_out)``.

    ``width`` is the LoRA's rank r (``router`` None) or SmartFed's M. Per matrix:
    LoRA: A x, B (A x); backward ∂B, ∂(A x), ∂A, ∂x: 3 r (d_in + d_out).
    SmartFed rank router: A x, logits W_r z (M²), B h; backward ∂h, ∂W_r, ∂z via the
    router, ∂x: 2 M (d_in + d_out) + 3 M². Linear router: A x, W_r x, B h; backward
    ∂h, ∂W_r, ∂x through A and through W_r: M (5 d_in + 2 d_out).
    """
    per_matrix = {
        None: lambda d_in, d_out: 3 * width * (d_in + d_out),
        "rank": lambda d_in, d_out: 2 * width * (d_in + d_out) + 3 * width**2,
        "linear": lambda d_in, d_out: width * (5 * d_in + 2 * d_out),
    }[router]
    return sum(per_matrix(d_in, d_out) for d_in, d_out in shapes)


# --- measurements --------------------------------------------------------------------------
def time_interleaved(variants: Sequence[Variant], device: torch.device, repeats: int, warmup: int) -> float | None:
    """Warm up every variant, then time them in turn, rotating the order each iteration."""
    for _ in range(warmup):
        for v in variants:
            v.loss = float(v.step())
    start = _cpu_jiffies()
    for i in range(repeats):
        for j in range(len(variants)):
            v = variants[(i + j) % len(variants)]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = v.step()
            _sync(device)
            v.times_ms.append((time.perf_counter() - t0) * 1e3)
            v.cpu_ms.append((time.process_time() - c0) * 1e3)
            v.loss = float(loss)
    return _others_share(start, _cpu_jiffies())


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def saved_activation_bytes(v: Variant) -> int:
    """Bytes autograd saves for backward in one step, per storage, parameters and buffers left out."""
    skip = {t.untyped_storage().data_ptr() for t in (*v.model.parameters(), *v.model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v.step()
    return sum(seen.values())


def cuda_step_peak_bytes(v: Variant, device: torch.device) -> int:
    """Peak CUDA memory of one step above what was allocated before it."""
    return peak_during(v.step, device)


def frozen_expert_tensors(model: MoreModel, device: torch.device) -> list[torch.Tensor]:
    """What SmartFed keeps on ``device`` beside the base weights: MoRE layer buffers and the pool it holds."""
    tensors = [b for layer in model.more_layers().values() for b in layer.buffers()]
    for pm in model.pool.modules.values():
        tensors += [pm.A, pm.B, pm.scale, pm.adapter_index, pm.rank_index]
    return [t for t in tensors if t.device.type == device.type]


def measure_memory(v: Variant, device: torch.device) -> None:
    """Fill v.memory; call after warm-up, so that the AdamW state exists."""
    step_bytes = cuda_step_peak_bytes(v, device) if device.type == "cuda" else saved_activation_bytes(v)
    params = [p for group in v.optimizer.param_groups for p in group["params"]]
    state = [t for s in v.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    v.memory = {
        "trainable": _storage_bytes(params),
        "grads": _storage_bytes(p.grad for p in params if p.grad is not None),
        "adamw": _storage_bytes(state),
        "frozen": _storage_bytes(frozen_expert_tensors(v.model, device)) if isinstance(v.model, MoreModel) else 0,
        "step": step_bytes,
    }


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def measure_uplink(v: Variant) -> None:
    """Bytes a client sends up after its round: SmartFed's routers and importance, FedIT's A and B."""
    if isinstance(v.model, MoreModel):
        stats = v.model.expert_stats().items() if v.stats else ()  # without statistics no importance is sent
        importance = {name: s["prob_contribution"] for name, s in stats}
        v.uplink = {"state": _nbytes(v.model.router_state_dict()), "importance": _nbytes(importance)}
    else:
        v.uplink = {"state": _nbytes(get_peft_model_state_dict(v.model)), "importance": 0}


def profile(variants: Sequence[Variant], rows: int, steps: int) -> str:
    """Top ops by self CPU time over ``steps`` steps of each variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-session start-up, discarded
        variants[0].step()
    out = []
    for v in variants:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                v.step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        out += [f"--- profile: {v.name}, {steps} step(s), top {rows} ops by self CPU time ---", table]
    return "\n".join(out)


# --- report --------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


NAME = 30  # width of the variant column


def _top_k_text(smartfed: Sequence[Variant]) -> str:
    ks = sorted({(v.experts, v.top_k) for v in smartfed})
    return ", ".join(f"{k} of M={m}" for m, k in ks) or "-"


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles of ``times[i] / reference[i]``: steps timed in the same interleaved iteration."""
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    # inclusive: quartiles stay within the measured ratios (the default extrapolates past them on few
    # repeats, down to negative 'ratios' on a loaded machine)
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def _dtype_short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, dtype_name(dtype))


def report(
    variants: Sequence[Variant],
    *,
    device: torch.device,
    args: argparse.Namespace,
    base_params: int,
    base_bytes: int,
    others: float | None,
    matrices: int,
) -> str:
    lora = variants[0]
    smartfed = variants[1:]
    step_memory = (
        "peak CUDA memory of the step above what was allocated before it"
        if device.type == "cuda"
        else "activations = bytes saved for backward (per storage, parameters and buffers left out)"
    )
    shape = SHAPES[args.shape]
    dtype = parse_dtype(args.dtype, device)
    lines = [
        "SmartFed vs FedIT (fresh PEFT LoRA): one client training step, memory and uplink per round",
        f"device {machine(device)}",
        f"model: random Llama, {shape.label} shapes: {shape.describe(args.layers)}; "
        f"{base_params:,} parameters ({_mib(base_bytes)} MiB {_dtype_short(dtype)}, shared by all variants)",
        f"batch {args.batch} x {args.seq} tokens (the same for all); step = forward + backward + AdamW(lr {LEARNING_RATE})",
        f"LoRA: rank {RANK}, alpha {ALPHA}, dropout 0 on {', '.join(TARGET_MODULES)} | SmartFed M=<M>: a pool of "
        f"{POOL_SIZE} adapters of rank M/{POOL_SIZE}, alpha 2·rank, on {', '.join(TARGET_MODULES)} -> M rank-one "
        f"experts x {matrices} matrices, top-K {_top_k_text(smartfed)}, gate scaled_softmax; '<name> stats': "
        "with expert statistics (EEQA or client budgets: the importance is accumulated and sent)",
        f"timing: median of {args.repeats} interleaved steps per variant after {args.warmup} warm-up step(s)",
        "",
        "client training step time",
    ]
    header = (
        f"  {'variant':<{NAME}} {'median ms':>10} {'min ms':>9} {'IQR/med':>8} {'CPU ms':>9} {'loss':>7} | "
        f"{'vs LoRA':>7} {'IQR':>11} {'target':>7} verdict | {'med/med':>7} {'min/min':>7} {'CPU/CPU':>7} | "
        f"{'MAC vs LoRA':>11}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for v in variants:
        cpu = statistics.median(v.cpu_ms)
        row = (
            f"  {v.name:<{NAME}} {v.median_ms:10.1f} {min(v.times_ms):9.1f} {v.spread:8.0%} {cpu:9.1f} {v.loss:7.3f} |"
        )
        if v is not lora:
            ratio, low, high = paired_ratio(v.times_ms, lora.times_ms)
            row += (
                f" {ratio:7.3f} {f'{low:.3f}-{high:.3f}':>11} {'<= ' + format(TIME_TARGET, '.2f'):>7} "
                f"{_verdict(ratio, TIME_TARGET)}    | {v.median_ms / lora.median_ms:7.3f} "
                f"{min(v.times_ms) / min(lora.times_ms):7.3f} {cpu / statistics.median(lora.cpu_ms):7.3f} | "
                f"{v.macs / lora.macs:11.2f}"
            )
        lines.append(row)
    share = "n/a" if others is None else f"{others:.0%}"
    lines += [
        "  vs LoRA: median over the iterations of this variant's step time over LoRA's in the same iteration (the "
        "verdict; pairing cancels slow drifts of the machine's speed), IQR: their quartiles; med/med: ratio of the "
        "median wall times; min/min: of the fastest steps; CPU/CPU: of the median CPU times of this process; "
        "MAC vs LoRA: multiply-adds of the "
        "low-rank matmuls per token, forward + backward, from the shapes (the rest of the step is the same for all)",
        f"  other processes used {share} of the machine's CPU during the timed steps "
        "(above ~10%, or IQR/med above ~10%: rerun before reading the ratios)",
        "",
        f"memory of one step, MiB ({step_memory}; the shared base weights, {_mib(base_bytes)} MiB, left out)",
    ]
    header = (
        f"  {'variant':<{NAME}} {'trainable':>9} {'grads':>7} {'AdamW':>7} {'frozen':>7} {'activ.':>8} {'total':>8} | "
        f"{'vs LoRA':>7} {'target':>7} verdict | {'w/ base':>7}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for v in variants:
        m = v.memory
        row = (
            f"  {v.name:<{NAME}} {_mib(m['trainable']):>9} {_mib(m['grads']):>7} {_mib(m['adamw']):>7} "
            f"{_mib(m['frozen']):>7} {_mib(m['step']):>8} {_mib(v.memory_total):>8} |"
        )
        if v is not lora:
            ratio = v.memory_total / lora.memory_total
            with_base = (v.memory_total + base_bytes) / (lora.memory_total + base_bytes)
            row += f" {ratio:7.3f} {'<= ' + format(MEMORY_TARGET, '.2f'):>7} {_verdict(ratio, MEMORY_TARGET)}    | {with_base:7.3f}"
        lines.append(row)
    lines.append(
        "  frozen: SmartFed's stacked experts (layer buffers + the pool it holds); AdamW: exp_avg, exp_avg_sq, step; "
        "w/ base: the total ratio with the base weights counted"
    )
    if device.type == "cuda":  # what the GPU had to hold: the shared base, every variant's state, a step's peak
        lines.append(f"  {process_peak_line(device)}")
    lines += [
        "",
        "bytes sent up per client per round",
    ]
    header = (
        f"  {'variant':<{NAME}} {'state B':>11} {'importance B':>12} {'total B':>11} | {'vs LoRA':>7} {'target':>7} verdict "
        f"{'LoRA/this':>9} | {'trainable params':>16} {'% of model':>10}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for v in variants:
        row = f"  {v.name:<{NAME}} {v.uplink['state']:>11,} {v.uplink['importance']:>12,} {v.uplink_total:>11,} |"
        if v is lora:
            row += " " * 35 + " |"
        else:
            ratio = v.uplink_total / lora.uplink_total
            row += (
                f" {ratio:7.3f} {'<= ' + format(UPLINK_TARGET, '.2f'):>7} {_verdict(ratio, UPLINK_TARGET)}    "
                f"{1 / ratio:8.2f}x |"
            )
        row += f" {v.trainable:>16,} {100 * v.trainable / base_params:9.3f}%"
        lines.append(row)
    lines.append(
        "  state: LoRA A and B (get_peft_model_state_dict) or SmartFed router_state_dict(); importance: "
        f"M float32 per matrix x {matrices} matrices, sent beside the router by the 'stats' variants only"
    )
    for v in smartfed:
        ratio = v.uplink_total / lora.uplink_total
        router_only = v.uplink["state"] / lora.uplink["state"]
        how = f"{1 / ratio:.2f}x fewer" if ratio < 1 else f"{ratio:.2f}x MORE"
        lines.append(
            f"  bytes {v.name}: router {v.uplink['state']:,} B + importance {v.uplink['importance']:,} B = "
            f"{v.uplink_total:,} B vs LoRA A+B {lora.uplink_total:,} B: {how} than LoRA "
            f"(router alone {router_only:.3f}x LoRA)"
        )
    return "\n".join(lines)


# --- entry point ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="smollm2",
        help="the model whose shapes the random base has: SmolLM2-135M (default) or Llama-2-7B",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (default: "
        + ", ".join(f"{s.default_layers} for {name}" for name, s in SHAPES.items())
        + "; quick: 2)",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (the paper's reference: 16)")
    parser.add_argument("--seq", type=int, default=48, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 12; quick: 2)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per variant first (default 2; quick: 1)"
    )
    parser.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS))
    parser.add_argument(
        "--pool-rank",
        type=int,
        nargs="+",
        default=list(POOL_RANKS),
        help=f"rank of each of the {POOL_SIZE} adapters of a pool, one pool per value (default "
        f"{' '.join(map(str, POOL_RANKS))}: M = {POOL_SIZE * POOL_RANKS[0]}, the LoRA's rank, and "
        f"M = {POOL_SIZE * POOL_RANKS[1]}, twice it)",
    )
    parser.add_argument("--top-k", type=int, default=None, help="SmartFed's K (default: M/2 for each pool)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the frozen base and the experts (default float32)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stats",
        choices=("off", "on", "both"),
        default="both",
        help="SmartFed steps without expert statistics (as without EEQA and client budgets), with them "
        "(as with either: the importance is accumulated and sent), or both side by side (default)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time SmartFed with the plain-autograd reference layer ('SmartFed <router> ref'), "
        "to see what the fused layer saves",
    )
    parser.add_argument("--profile", action="store_true", help="print the top ops by self CPU time of one step each")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--profile-steps", type=int, default=2, help="steps per variant under the profiler")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, batch 2 x 16, 2 repeats")
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = SHAPES[args.shape].default_layers
    if args.quick:
        args.layers, args.batch, args.seq = min(2, args.layers), 2, 16
    try:  # a clear message now rather than a CUDA error from deep inside the first step
        parse_dtype(args.dtype, parse_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    if args.repeats is None:
        args.repeats = 2 if args.quick else 12
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.layers < 1 or args.batch < 1 or args.seq < 2 or args.repeats < 1 or args.warmup < 1:
        parser.error("--layers, --batch, --repeats and --warmup must be >= 1 and --seq >= 2")
    if min(args.pool_rank) < 1 or (args.top_k is not None and not 1 <= args.top_k <= POOL_SIZE * min(args.pool_rank)):
        parser.error(f"--pool-rank must be >= 1 and --top-k between 1 and M; got {args.pool_rank} and {args.top_k}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # transformers 5 warns about its own deprecated call inside every forward of a PEFT model
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    shape = SHAPES[args.shape]
    base = build_base(args.layers, device, args.seed, shape, parse_dtype(args.dtype, device))
    base_params = sum(p.numel() for p in base.parameters())
    base_bytes = _storage_bytes(base.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(3, shape.llama["vocab_size"], (args.batch, args.seq), generator=gen).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    variants = [make_lora(base, batch)]
    stats_modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.stats]
    for pool_rank in args.pool_rank:
        with tempfile.TemporaryDirectory(prefix="smartfed-round-") as tmp:
            paths = [
                make_adapter(base, Path(tmp) / f"adapter{i}", seed=args.seed + 10 + i, rank=pool_rank)
                for i in range(POOL_SIZE)
            ]
            pool = LoraPool.load(paths)
        for stats, router in itertools.product(stats_modes, args.routers):
            variants.append(make_smartfed(base, pool, router, batch, stats=stats, top_k=args.top_k))
            if args.reference:
                variants.append(make_smartfed(base, pool, router, batch, stats=stats, top_k=args.top_k, fused=False))
    shapes = [(pm.in_features, pm.out_features) for pm in pool.modules.values()]
    for v in variants:
        v.macs = low_rank_macs(v.router, v.experts if v.router else RANK, shapes)

    others = time_interleaved(variants, device, args.repeats, args.warmup)
    for v in variants:
        measure_memory(v, device)
        measure_uplink(v)
    print(
        report(
            variants,
            device=device,
            args=args,
            base_params=base_params,
            base_bytes=base_bytes,
            others=others,
            matrices=len(pool.modules),
        ),
        flush=True,
    )
    if args.profile:
        print("\n" + profile(variants, args.profile_rows, args.profile_steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
