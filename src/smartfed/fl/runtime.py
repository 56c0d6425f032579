"""What a ServerApp or ClientApp builds from a RunConfig: model, pool, method, data.

Built once per process and cached: a simulated client (a Ray actor) trains many
rounds, and loading the base model each round would dominate the run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import Task, load_task, partition_dataset
from ..methods import Method, check_sources, get_method_class, load_builtin_methods
from ..models import load_model_and_tokenizer
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


def build_runtime(config: RunConfig) -> Runtime:
    """Everything a process needs for ``config``, freshly built."""
    load_builtin_methods()
    check_sources(config)
    method = get_method_class(config.method)(config)
    model, tokenizer = load_model_and_tokenizer(config.model_name_or_path)
    pool = LoraPool.load(resolve_pool(config.lora_pool)) if config.lora_pool else None
    model = method.build(model, pool, torch.Generator().manual_seed(derive_seed(config.seed, "init")))
    task, train, test = load_task(config.task, seed=config.seed, num_train=config.num_train, num_test=config.num_test)
    partitions = partition_dataset(
        train, config.num_clients, scheme=config.partition, alpha=config.alpha, seed=config.seed
    )
    return Runtime(config, method, model, tokenizer, pool, task, train, test, partitions)


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
