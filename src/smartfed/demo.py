"""A one-minute MoRE demo on a tiny random Llama (until the real benchmark lands).

Two "skills" are trained as ordinary PEFT LoRA adapters on a tiny model: skill
``up`` maps every token t to t+1, skill ``down`` maps t to t-1. The new task
needs both: even tokens go up, odd tokens go down. No single adapter solves it,
merging them cancels them out; a router over their rank-one experts (MoRE)
learns which pieces to use for each token, training only the router.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from .more import LoraPool, MoreConfig, attach_more

VOCAB = 32
SEQ_LEN = 12


@dataclass
class DemoResult:
    accuracy: dict[str, float]
    router_losses: list[float]


def _rule_up(t: torch.Tensor) -> torch.Tensor:
    return (t + 1) % VOCAB


def _rule_down(t: torch.Tensor) -> torch.Tensor:
    return (t - 1) % VOCAB


def _rule_mixed(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t % 2 == 0, _rule_up(t), _rule_down(t))


def _batch(
    rule: Callable[[torch.Tensor], torch.Tensor], n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of random tokens; the label of position i is rule(token i)."""
    x = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=generator)
    return x, rule(x)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits  # (n, L, V)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(input_ids=x).logits.argmax(-1) == y).float().mean().item()


def _train(model: torch.nn.Module, params, rule, steps: int, lr: float, generator: torch.Generator) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = _loss(model, *_batch(rule, 32, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _tiny_base(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN,
    )
    return LlamaForCausalLM(config)


def _train_skill(base, rule, folder: Path, generator: torch.Generator) -> Path:
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], lora_dropout=0.0
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    _train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], rule, 150, 1e-2, generator)
    peft_model.save_pretrained(folder)
    return folder


def run_demo(console: Console | None = None, seed: int = 0) -> DemoResult:
    """Train two skill adapters, then a router over their experts; print and return the accuracies."""
    console = console or Console()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    generator = torch.Generator().manual_seed(seed)
    base = _tiny_base(seed)
    # The base learns the identity map first, so the skills are small edits of a working model.
    _train(base, base.parameters(), lambda t: t, 150, 3e-3, generator)
    base.eval()
    test_x, test_y = _batch(_rule_mixed, 256, torch.Generator().manual_seed(seed + 1))

    with tempfile.TemporaryDirectory(prefix="smartfed-demo-") as tmp:
        console.print("[bold]1. Two existing skills[/] as PEFT LoRA adapters (r=8): 'up' (t→t+1), 'down' (t→t−1)")
        folders = [
            _train_skill(base, rule, Path(tmp) / name, generator)
            for name, rule in (("up", _rule_up), ("down", _rule_down))
        ]
        pool = LoraPool.load(folders)
        console.print(f"   {pool}", markup=False)

        console.print("[bold]2. New task[/]: even tokens go up, odd tokens go down. Held-out accuracy before routing:")
        accuracy = {"base model": _accuracy(base, test_x, test_y)}
        sum_config = MoreConfig(top_k=None, router_init="zeros")  # a zero router, K = M: the plain sum
        for name in ("up", "down"):
            single = attach_more(copy.deepcopy(base), LoraPool.load([Path(tmp) / name]), sum_config)
            accuracy[f"adapter '{name}' alone"] = _accuracy(single, test_x, test_y)
        merged = attach_more(copy.deepcopy(base), pool, sum_config)
        accuracy["sum merge of both"] = _accuracy(merged, test_x, test_y)

        config = MoreConfig(top_k=8, router="linear")
        model = attach_more(copy.deepcopy(base), pool, config, generator=generator)
        trainable, total = model.num_parameters_summary()
        console.print(
            f"[bold]3. MoRE[/]: {pool.num_experts} rank-one experts, top-{config.top_k} per matrix; "
            f"training only the routers: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
        )
        losses = _train(model, model.trainable_parameters(), _rule_mixed, 120, 2e-2, generator)
        console.print(f"   router training loss: {losses[0]:.3f} → {losses[-1]:.3f}")
        per_matrix = max(m.num_experts for m in pool.modules.values())
        accuracy[f"MoRE router (top-{config.top_k} of {per_matrix} per matrix)"] = _accuracy(model, test_x, test_y)

    table = Table(title="Held-out accuracy on the new task (1/32 is chance)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for name, value in accuracy.items():
        table.add_row(name, f"{value:.3f}")
    console.print(table)
    return DemoResult(accuracy=accuracy, router_losses=losses)
