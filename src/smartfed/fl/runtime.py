"""What a ServerApp or ClientApp builds from a RunConfig: model, pool, method, data.

Built once per process and cached: a simulated client (a Ray actor) trains many
rounds, and loading the base model each round would dominate the run.

The model lives on the run's device (``--device``) in its dtype (``--dtype``, or a 4/8-bit
base); every tensor that crosses a process boundary (states, extras, checkpoints) is
moved to the CPU first, and what comes in is copied into the model's own tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import Task, load_task, partition_dataset
from ..methods import Method, check_sources, get_method_class, load_builtin_methods
from ..models import load_model_and_tokenizer, place_on, resolve_device
from ..more import LoraPool
from ..run.config import RunConfig
from ..run.pools import resolve_pool
from ..run.seeds import derive_seed

_LOCK = threading.Lock()


@dataclass
class Runtime:
    config: RunConfig
    method: Method
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    pool: LoraPool | None
    task: Task
    train: datasets.Dataset
    test: datasets.Dataset
    partitions: list[datasets.Dataset]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model is: batches go there


def load_base(config: RunConfig, device: torch.device) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The run's base model and tokenizer on ``device``, in the run's dtype or quantisation."""
    return load_model_and_tokenizer(
        config.model_name_or_path,
        device=device,
        dtype=config.dtype,
        load_in_4bit=config.load_in_4bit,
        load_in_8bit=config.load_in_8bit,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def build_runtime(config: RunConfig) -> Runtime:
    """Everything a process needs for ``config``, freshly built."""
    load_builtin_methods()
    check_sources(config)
    method = get_method_class(config.method)(config)
    device = resolve_device(config.device)
    model, tokenizer = load_base(config, device)
    pool = LoraPool.load(resolve_pool(config.lora_pool)) if config.lora_pool else None
    model = method.build(model, pool, torch.Generator().manual_seed(derive_seed(config.seed, "init")))
    if device.type != "cpu":
        place_on(model, device)  # what a method made on the CPU (gates, buffers) joins the base
    task, train, test = load_task(config.task, seed=config.seed, num_train=config.num_train, num_test=config.num_test)
    partitions = partition_dataset(
        train, config.num_clients, scheme=config.partition, alpha=config.alpha, seed=config.seed
    )
    return Runtime(config, method, model, tokenizer, pool, task, train, test, partitions, device)


def cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``tensors`` that live elsewhere (CPU tensors pass as they are, not copied).

    What leaves the model for the wire, a checkpoint or the server's arithmetic with the clients'
    replies (which arrive on the CPU) is on the CPU, whatever device the model is on.
    """
    return {k: v.detach() if v.device.type == "cpu" else v.detach().cpu() for k, v in tensors.items()}


@lru_cache(maxsize=2)
def _cached(config_json: str) -> Runtime:
    import json

    return build_runtime(RunConfig.from_dict(json.loads(config_json)))


def get_runtime(config: RunConfig) -> Runtime:
    """The process-wide runtime of ``config`` (built on first use)."""
    import json

    key = json.dumps({k: v for k, v in config.to_dict().items() if k != "output_dir"}, sort_keys=True)
    with _LOCK:
        return _cached(key)
