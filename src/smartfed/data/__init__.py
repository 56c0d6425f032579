"""Instruction data for SmartFed: tasks, real datasets, federated partitions, training batches, a test tokenizer.

Modules, bottom up: ``common`` (``Task``, the columns, JSONL iteration),
``readers`` (one module per real dataset family, and Alpaca-style JSONL),
``real`` (``NAME[.OPTION][:PATH]`` specs and their splits), ``tasks`` (the task
registry and ``load_task``), ``composite`` (the default benchmark's tasks).
"""

from . import composite  # noqa: F401 (registers the default benchmark's skills and compositions)
from .collate import (
    IGNORE_INDEX,
    batches,
    encode_examples,
    encode_prompt,
    format_prompt,
    has_chat_template,
    pad_token_id,
)
from .partition import partition_dataset
from .readers import (
    REAL_DATASETS,
    list_real_datasets,
    read_alpaca_jsonl,
    read_dolly,
    read_gsm8k,
    read_gsm_hard,
    read_humaneval,
    read_math23k,
    read_mbpp,
    read_mgsm,
)
from .real import RealTask, load_real_task, parse_real_spec
from .tasks import TASKS, Task, TaskSpec, list_tasks, load_task, register_task
from .tokenizer import char_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "REAL_DATASETS",
    "TASKS",
    "RealTask",
    "Task",
    "TaskSpec",
    "batches",
    "char_tokenizer",
    "encode_examples",
    "encode_prompt",
    "format_prompt",
    "has_chat_template",
    "list_real_datasets",
    "list_tasks",
    "load_real_task",
    "load_task",
    "pad_token_id",
    "parse_real_spec",
    "partition_dataset",
    "read_alpaca_jsonl",
    "read_dolly",
    "read_gsm8k",
    "read_gsm_hard",
    "read_humaneval",
    "read_math23k",
    "read_mbpp",
    "read_mgsm",
    "register_task",
]
