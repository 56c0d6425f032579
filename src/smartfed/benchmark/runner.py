"""The default benchmark: compose two existing skill adapters on a real pretrained LLM (``make demo``).

Claim under test (the SmartFed paper, Wu et al., 2025; docs/design.md §7): existing skill adapters, composed by
a router trained federatedly, solve a task that needs both skills, which no
single adapter, no static merge and no fresh LoRA of the same budget solves as
well. Base: SmolLM2-135M-Instruct from its PyPI wheel; pool: the example zoo's
``json`` and ``math`` adapters; task: ``json_math`` (``smartfed.data.composite``),
scored on 220 held-out items that no training ever saw, the same items for every
method and seed (paired comparisons).

One seed runs, all on the same held-out items:

* gates: each adapter on its own skill and on the composite; the sum and
  average merges on each skill (does the skill survive the merge?); the chance
  baseline (the most frequent training answer for every item);
* static systems (seed-independent, greedy decoding): base, each adapter, sum
  and average merges (PEFT ``add_weighted_adapter``, ``cat``: the exact sums);
* federated systems on Flower's simulation engine, same clients, rounds, steps
  and data: SmartFed (routers over the adapters' rank-one experts) and FedIT
  (a fresh LoRA, FedAvg);
* ``controls=True`` adds, centralised with the same number of steps: continued
  fine-tuning of the stronger adapter on the composite data, and a static
  per-expert gate (the router's input weights frozen at zero: only its bias,
  the same for every token, is learnt).

Results: ``<out>/results.json`` (every score and per-item vector), ``table.md``
and ``metric_vs_round.png``.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from rich.console import Console

from ..data import batches, load_task
from ..data.composite import COMPOSITES, SKILLS
from ..eval.generate import generate_answers
from ..eval.programs import per_example_scores
from .tables import plot_rounds, print_table, render_markdown, summarise, write_results

MAX_NEW_TOKENS = 16
EVAL_BATCH = 32
MEMORISATION_ITEMS = 100  # training items re-scored after training: train vs held-out score


@dataclass
class CompositionConfig:
    """One run of the benchmark; defaults fit ``make demo`` in 15 minutes on 2 cores."""

    composite: str = field(default="json_math", metadata={"help": f"Composite task: {sorted(COMPOSITES)}."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds (training data, init, sampling)."})
    model: str = field(default="smollm2-135m", metadata={"help": "Base model."})
    zoo: str = field(default="", metadata={"help": "Zoo folder (default: the repository's zoo/smollm2-135m)."})
    num_clients: int = field(default=4, metadata={"help": "Clients (IID partitions of the composite data)."})
    sample_clients: int = field(default=2, metadata={"help": "Clients per round."})
    num_rounds: int = field(default=5, metadata={"help": "Rounds."})
    local_steps: int = field(default=12, metadata={"help": "Local steps per client per round."})
    batch_size: int = field(default=8, metadata={"help": "Batch size."})
    num_train: int = field(default=300, metadata={"help": "Composite training items over all clients."})
    num_test: int = field(default=220, metadata={"help": "Held-out composite items."})
    router_lr: float = field(default=5e-3, metadata={"help": "SmartFed router learning rate."})
    lora_lr: float = field(default=2e-3, metadata={"help": "Learning rate of LoRAs (FedIT, continued fine-tuning)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (against memorisation)."})
    topk_experts: int = field(default=8, metadata={"help": "SmartFed K."})
    lora_rank: int = field(default=16, metadata={"help": "FedIT's LoRA rank."})
    eval_every: int = field(
        default=2, metadata={"help": "Rounds between held-out evaluations (plots); the last round always."}
    )
    wire_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the federated runs' states travel in, both ways (smartfed run --wire_dtype)."},
    )
    controls: bool = field(default=False, metadata={"help": "Also run the controls (continued FT, static gate)."})
    out: str = field(default="runs/demo", metadata={"help": "Output folder."})
    device: str = field(
        default="auto", metadata={"help": "Where models load and train: 'auto' (CUDA when present), 'cpu', 'cuda:N'."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the base: 'auto' (bf16/fp16 on a GPU, float32 on the CPU) or a dtype name."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantise the base to 4-bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantise the base to 8-bit (bitsandbytes)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (less memory)."}
    )
    client_gpus: float = field(default=0.0, metadata={"help": "GPUs per simulated client (Ray num_gpus)."})

    def __post_init__(self) -> None:
        if self.composite not in COMPOSITES:
            raise ValueError(f"composite={self.composite!r} is not one of {sorted(COMPOSITES)}")
        for name in ("num_clients", "sample_clients", "num_rounds", "local_steps", "batch_size", "num_train"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_test < 20:
            raise ValueError(f"num_test={self.num_test!r}: at least 20 held-out items")
        wire_dtypes = ("float32", "bfloat16", "float16")
        if self.wire_dtype not in wire_dtypes:
            raise ValueError(f"wire_dtype={self.wire_dtype!r} is not one of {list(wire_dtypes)}")
        self.seed_list()
        _run_config(self, 0, "", "smartfed", Path(self.out))  # the device settings, checked as a run checks them

    def placement(self) -> dict[str, Any]:
        """The keyword arguments of ``load_model_and_tokenizer`` for the base (device, dtype, quantisation)."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"seeds={self.seeds!r} must be comma-separated integers") from None
        if not seeds:
            raise ValueError(f"seeds={self.seeds!r} names no seed")
        return seeds

    def total_steps(self) -> int:
        """Optimiser steps of one federated run (what the centralised controls get too)."""
        return self.num_rounds * self.sample_clients * self.local_steps


# --------------------------------------------------------------------------- scoring


def score_items(model: Any, tokenizer: Any, task: Any, dataset: Any) -> list[float]:
    """Per-item scores of the model's greedy answers (the vector paired comparisons need)."""
    with torch.no_grad():
        preds = generate_answers(
            model, tokenizer, list(dataset["prompt"]), max_new_tokens=MAX_NEW_TOKENS, batch_size=EVAL_BATCH
        )
    return per_example_scores(task.metric, preds, dataset)


def chance_items(task: Any, train: Any, test: Any) -> list[float]:
    """The most frequent training answer given to every held-out item."""
    answer = Counter(train["answer"]).most_common(1)[0][0]
    return per_example_scores(task.metric, [answer] * len(test), test)


# --------------------------------------------------------------------------- static systems


def _with_adapters(base: torch.nn.Module, adapters: dict[str, str]) -> PeftModel:
    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def static_systems(base: torch.nn.Module, adapters: dict[str, str]) -> dict[str, torch.nn.Module]:
    """Base, each adapter alone, and the exact sum and average of their ΔW (PEFT ``cat`` combination)."""
    systems: dict[str, torch.nn.Module] = {"base": base}
    for name, path in adapters.items():
        systems[f"adapter:{name}"] = _with_adapters(base, {name: path})
    names = list(adapters)
    for label, weight in (("merge:sum", 1.0), ("merge:average", 1.0 / len(names))):
        model = _with_adapters(base, adapters)
        model.add_weighted_adapter(names, [weight] * len(names), label, combination_type="cat")
        model.set_adapter(label)
        systems[label] = model
    return systems


# --------------------------------------------------------------------------- federated systems


def _run_config(config: CompositionConfig, seed: int, pool: str, method: str, out: Path) -> Any:
    from ..run.config import RunConfig

    lora = method != "smartfed"
    return RunConfig(
        model_name_or_path=config.model,
        lora_pool=pool,
        task=config.composite,
        method=method,
        num_clients=config.num_clients,
        sample_clients=config.sample_clients,
        num_rounds=config.num_rounds,
        local_steps=config.local_steps,
        batch_size=config.batch_size,
        learning_rate=config.lora_lr if lora else config.router_lr,
        weight_decay=config.weight_decay,
        topk_experts=config.topk_experts,
        lora_rank=config.lora_rank,
        lora_alpha=2.0 * config.lora_rank,
        num_train=config.num_train,
        num_test=config.num_test,
        max_length=96,
        max_new_tokens=MAX_NEW_TOKENS,
        eval_every=config.eval_every,
        seed=seed,
        client_threads=1,
        wire_dtype=config.wire_dtype,
        output_dir=str(out),
        device=config.device,
        dtype=config.dtype,
        load_in_4bit=config.load_in_4bit,
        load_in_8bit=config.load_in_8bit,
        gradient_checkpointing=config.gradient_checkpointing,
        client_gpus=config.client_gpus,
    )


def federated_run(config: CompositionConfig, seed: int, pool: str, method: str, out: Path) -> dict[str, Any]:
    """One Flower simulation; returns its metrics rows, the loaded final model and its wall time."""
    from ..fl.simulation import run_simulation
    from ..serving.inference import load

    started = time.monotonic()
    # out is the demo's own <out>/seed<k>/<method> folder: a rerun replaces the previous run there
    # (overwrite deletes only a SmartFed run folder, and never mixes two runs)
    run_simulation(_run_config(config, seed, pool, method, out), progress=True, overwrite=True)
    wall = time.monotonic() - started
    loaded = load(out, device=config.device)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"model": loaded.model, "rows": rows, "wall_seconds": wall}


# --------------------------------------------------------------------------- controls


def _train_centralised(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    train: Any,
    tokenizer: Any,
    config: CompositionConfig,
    lr: float,
    seed: int,
) -> None:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    model.train()
    for batch in batches(
        train, tokenizer, batch_size=config.batch_size, steps=config.total_steps(), seed=seed, max_length=96
    ):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def continued_finetuning(
    base: torch.nn.Module, adapter: str, train: Any, tokenizer: Any, config: CompositionConfig, seed: int
) -> torch.nn.Module:
    """The stronger adapter, trained further on the composite data (all its LoRA weights)."""
    torch.manual_seed(seed)
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    _train_centralised(model, params, train, tokenizer, config, config.lora_lr, seed)
    return model


def static_gate(
    base: torch.nn.Module, pool: Any, train: Any, tokenizer: Any, config: CompositionConfig, seed: int
) -> torch.nn.Module:
    """MoRE whose router sees no input: weights frozen at zero, only the per-expert bias is learnt."""
    from ..more import MoreConfig, attach_more

    more = attach_more(
        copy.deepcopy(base),
        pool,
        MoreConfig(top_k=config.topk_experts, router_init="zeros"),
        generator=torch.Generator().manual_seed(seed),
    )
    params = []
    for name, param in more.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias"):
            params.append(param)
        else:
            param.requires_grad_(False)
            param.data.zero_()
    if not params:
        raise ValueError("static gate control: the router has no bias to learn")
    _train_centralised(more, params, train, tokenizer, config, config.router_lr, seed)
    return more


# --------------------------------------------------------------------------- the benchmark


def run_composition(config: CompositionConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the benchmark for every seed; write results.json, table.md and the plot; return the results."""
    from ..models import load_model_and_tokenizer
    from ..more import LoraPool
    from ..zoo import default_zoo_dir, read_manifest

    console = console or Console()
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    zoo = Path(config.zoo).expanduser() if config.zoo else default_zoo_dir()
    read_manifest(zoo)  # a clear error when the zoo is missing
    skill_names = COMPOSITES[config.composite]
    adapters = {name: str(zoo / name) for name in skill_names}
    pool_spec = ",".join(adapters.values())
    base, tokenizer = load_model_and_tokenizer(config.model, **config.placement())
    task, _, test = load_task(config.composite, seed=0, num_train=1, num_test=config.num_test)
    results: dict[str, Any] = {"config": asdict(config), "test_items": len(test), "gates": {}, "items": {}, "seeds": {}}

    console.print(f"[bold]Static systems[/] on {len(test)} held-out '{config.composite}' items")
    statics = static_systems(base, adapters)
    for label, model in statics.items():
        results["items"][label] = score_items(model, tokenizer, task, test)
    # gates: each skill on its own test and whether it survives the merges
    for name in skill_names:
        skill_task, _, skill_test = load_task(SKILLS[name], seed=0, num_train=1, num_test=100)
        for label in ("base", f"adapter:{name}", "merge:sum", "merge:average"):
            results["gates"][f"{label} on {SKILLS[name]}"] = sum(
                score_items(statics[label], tokenizer, skill_task, skill_test)
            ) / len(skill_test)
    del statics

    for seed in config.seed_list():
        _, train, _ = load_task(config.composite, seed=seed, num_train=config.num_train, num_test=config.num_test)
        results["items"].setdefault("chance", chance_items(task, train, test))
        seed_out: dict[str, Any] = {}
        for method in ("smartfed", "fedit"):
            console.print(
                f"[bold]seed {seed}: {method}[/] ({config.num_rounds} rounds × {config.sample_clients} clients × {config.local_steps} steps)"
            )
            run = federated_run(config, seed, pool_spec, method, out / f"seed{seed}" / method)
            items = score_items(run["model"], tokenizer, task, test)
            seen = train.select(range(min(len(train), MEMORISATION_ITEMS)))
            train_items = score_items(run["model"], tokenizer, task, seen)
            seed_out[method] = {
                "items": items,
                "train_score": sum(train_items) / len(train_items),  # memorisation check: train vs held-out
                "rows": run["rows"],
                "wall_seconds": run["wall_seconds"],
                "bytes_up_total": sum(r["bytes_up"] for r in run["rows"]),
            }
            del run
        if config.controls:
            pool = LoraPool.load(pool_spec)
            composite_scores = {n: sum(results["items"][f"adapter:{n}"]) for n in skill_names}
            stronger = max(composite_scores, key=composite_scores.get)
            console.print(f"[bold]seed {seed}: controls[/] (continued fine-tuning of '{stronger}', static gate)")
            model = continued_finetuning(base, adapters[stronger], train, tokenizer, config, seed)
            seed_out[f"continued:{stronger}"] = {"items": score_items(model, tokenizer, task, test)}
            model = static_gate(base, pool, train, tokenizer, config, seed)
            seed_out["static_gate"] = {"items": score_items(model, tokenizer, task, test)}
            del model
        results["seeds"][str(seed)] = seed_out
        write_results(out, results)
    summary = summarise(results)
    results["summary"] = summary
    write_results(out, results)
    (out / "table.md").write_text(render_markdown(results))
    plot_rounds(results, out / "metric_vs_round.png")
    print_table(console, results)
    return results
