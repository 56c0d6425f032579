"""Tiny random models and PEFT adapters made on the spot: no hub, no downloads."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

if TYPE_CHECKING:
    from smartfed.run.config import RunConfig


def pytest_configure(config: pytest.Config) -> None:
    # run_simulation sets this before Ray's first import (Ray reads it then); a test module may import Ray
    # earlier, so set it for the whole session: Ray's servers then bind loopback only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def make_adapter(
    base: torch.nn.Module,
    path: Path,
    *,
    r: int = 4,
    alpha: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
    **kwargs,
) -> Path:
    """A PEFT LoRA adapter with random (nonzero) A and B, saved with save_pretrained."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False, lora_dropout=0.0, **kwargs
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # make the update large enough to move the logits visibly
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed))
    peft_model.save_pretrained(path)
    return path


def save_tiny_assets(root: Path) -> tuple[Path, Path, Path]:
    """A tiny Llama saved as a transformers folder (with the char tokenizer) and two PEFT adapters for it.

    Returns (model folder, adapter 'math', adapter 'json').
    """
    from smartfed.data import char_tokenizer

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    a = make_adapter(model, root / "math", r=4, alpha=8, seed=1)
    b = make_adapter(model, root / "json", r=4, alpha=8, seed=2)
    return root / "model", a, b


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory) -> dict[str, str]:
    """A saved tiny model and a two-adapter pool spec, shared by a test module's federated runs."""
    model_dir, a, b = save_tiny_assets(tmp_path_factory.mktemp("run_assets"))
    return {"model": str(model_dir), "pool": f"{a},{b}"}


def tiny_run_config(assets: dict[str, str], out: Path, method: str, **overrides: object) -> RunConfig:
    """A 2-round, 3-client, 2-sampled run of `method` on the tiny assets; `overrides` replace any field."""
    from smartfed.run.config import RunConfig

    values = dict(
        model_name_or_path=assets["model"],
        lora_pool=assets["pool"],
        method=method,
        task="arith",
        num_clients=3,
        sample_clients=2,
        num_rounds=2,
        local_steps=2,
        batch_size=4,
        learning_rate=1e-2,
        lora_rank=4,
        lora_alpha=8.0,
        num_train=24,
        num_test=4,
        max_length=32,
        max_new_tokens=2,
        energy="none",
        seed=3,
        output_dir=str(out),
    )
    values.update(overrides)
    return RunConfig(**values)


def run_in_process(config: RunConfig) -> None:
    """The real ServerApp loop and ClientApp on an in-process Grid (messages serialised as on the wire), no Ray."""
    from smartfed.fl.client_app import make_client_app
    from smartfed.fl.server_app import run_server

    from .local_grid import LocalGrid

    run_server(LocalGrid(make_client_app(config), config.num_clients), config, progress=False)


@pytest.fixture
def llama() -> Callable[[], LlamaForCausalLM]:
    """A factory of identical fresh tiny Llamas (each test wraps its own copy)."""
    return lambda: tiny_llama(seed=0)


@pytest.fixture
def two_adapters(tmp_path: Path) -> tuple[Path, Path]:
    base = tiny_llama(seed=0)
    a = make_adapter(base, tmp_path / "math", r=4, alpha=8, seed=1)
    b = make_adapter(base, tmp_path / "json", r=2, alpha=4, seed=2)
    return a, b


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
