"""Instruction data for SmartFed: tasks, federated partitions, training batches, a test tokenizer."""

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
from .tasks import TASKS, Task, TaskSpec, list_tasks, load_task, read_alpaca_jsonl, register_task
from .tokenizer import char_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Task",
    "TaskSpec",
    "batches",
    "char_tokenizer",
    "encode_examples",
    "encode_prompt",
    "format_prompt",
    "has_chat_template",
    "list_tasks",
    "load_task",
    "pad_token_id",
    "partition_dataset",
    "read_alpaca_jsonl",
    "register_task",
]

from .real import (  # appended: real datasets
    REAL_DATASETS,
    RealTask,
    list_real_datasets,
    load_real_task,
    parse_real_spec,
    read_dolly,
    read_gsm8k,
    read_gsm_hard,
    read_humaneval,
    read_math23k,
    read_mbpp,
    read_mgsm,
)

__all__ += [
    "REAL_DATASETS",
    "RealTask",
    "list_real_datasets",
    "load_real_task",
    "parse_real_spec",
    "read_dolly",
    "read_gsm8k",
    "read_gsm_hard",
    "read_humaneval",
    "read_math23k",
    "read_mbpp",
    "read_mgsm",
]
