"""What a ServerApp or ClientApp builds from a RunConfig: model, pool, method, data.

Built once per process and cached: a simulated client (a Ray actor) trains many
rounds, and loading the base model each round would dominate the run.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..data import Task, load_task, partition_dataset
from ..methods import Method, get_method_class, load_builtin_methods
from ..models import resolve_model
from ..more import LoraPool
from ..zoo import resolve_pool
from .run_config import RunConfig

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


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def load_model_and_tokenizer(model_name_or_path: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A transformers causal LM and its tokenizer: a folder, a Hub id, a ``.gguf`` file or ``smollm2-135m``.

    GGUF models are de-quantised once into a cached folder (``smartfed.models``).
    """
    if not model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    model_name_or_path = resolve_model(model_name_or_path)
    local = Path(model_name_or_path).expanduser()
    if not local.exists() and model_name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {model_name_or_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32)
    except OSError as err:
        raise FileNotFoundError(f"model {model_name_or_path!r}: cannot load it ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def build_runtime(config: RunConfig) -> Runtime:
    """Everything a process needs for ``config``, freshly built."""
    load_builtin_methods()
    config.require_sources()
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
