"""Instruction tasks: a registry of synthetic ones and Alpaca-style JSONL files.

Every task comes out of ``load_task`` the same way: a ``Task`` (how to score it)
and two in-memory ``datasets.Dataset`` (train, test) with the columns
``prompt`` (str), ``answer`` (str) and ``label`` (int, what a Dirichlet
partition skews on; 0 when the task has no label). Train and test never share a
prompt. Nothing is downloaded (docs/design.md §5).

Built-in tasks, deterministic from the seed, short prompts (≤ 24 characters) so
that tiny models learn something in a few steps:

* ``arith``: ``"12+7="`` → ``"19"``; operands 0..24, subtraction never goes
  negative; label = the operation (0 ``+``, 1 ``-``, 2 ``*``); metric ``numeric``.
* ``json_arith``: ``"JSON: 12+7="`` → ``'{"answer": 19}'``; the same questions,
  a form skill on top of a content skill (docs/design.md §7); metric ``exact_match``.
* ``copy``: ``"Upper: abcde"`` → ``"ABCDE"`` (random lowercase words of 3–8
  letters); label = length bucket (0: 3–4, 1: 5–6, 2: 7–8); metric ``exact_match``.

New tasks register a builder ``(num_examples, seed) -> datasets.Dataset`` with
``@register_task(name, ...)``; the builder returns raw fields, and the ``Task``
says how they become a prompt, an answer and a label.

``Task`` and the columns live in ``smartfed.data.common``, the readers of files
(Alpaca-style JSONL, real datasets) in ``smartfed.data.readers``; both are
re-exported here.
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from .common import COLUMNS, FEATURES, MetricName, Task, check_count, dedup, iter_jsonl_objects, to_dataset
from .readers.alpaca import read_alpaca_jsonl
from .real import load_real_task, parse_real_spec

__all__ = [
    "COLUMNS",
    "FEATURES",
    "JSONL_MAX_TEST_FRACTION",
    "ROUGE_MIN_WORDS",
    "TASKS",
    "Builder",
    "MetricName",
    "Splitter",
    "Task",
    "TaskSpec",
    "iter_jsonl_objects",
    "list_tasks",
    "load_task",
    "read_alpaca_jsonl",
    "register_task",
]

Builder = Callable[[int, int], Dataset]
Splitter = Callable[[int, int, int], tuple[Dataset, Dataset]]
"""``(seed, num_train, num_test) -> (train, test)`` raw records, for tasks whose split is part of their design."""

ROUGE_MIN_WORDS = 3.0
"""A JSONL task is scored with ROUGE-L when its answers average more words than this."""

JSONL_MAX_TEST_FRACTION = 0.2
"""A JSONL file gives at most this fraction of its records (at least one) to the test split."""


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its ``Task`` and the builder of its raw records."""

    task: Task
    builder: Builder
    splitter: Splitter | None = None  # when set, the task owns its train/test split (e.g. fixed held-out items)

    def build(self, num_examples: int, seed: int) -> Dataset:
        """Call the builder and check it returned a ``datasets.Dataset``."""
        dataset = self.builder(num_examples, seed)
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"builder of task {self.task.name!r} returned {type(dataset).__name__}, not a datasets.Dataset"
            )
        return dataset


TASKS: dict[str, TaskSpec] = {}
"""The task registry, filled by ``@register_task``."""


def register_task(
    name: str,
    *,
    metric: MetricName = "exact_match",
    prompt_template: str = "{prompt}",
    answer_field: str = "answer",
    label_field: str | None = None,
    description: str | None = None,
    splitter: Splitter | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder ``(num_examples, seed) -> datasets.Dataset`` under ``name``.

    The builder must be deterministic in ``seed`` and may repeat prompts
    (``load_task`` deduplicates). ``description`` defaults to the first line of
    the builder's docstring. ``splitter``, when given, makes the train/test split
    itself (``load_task`` then only deduplicates and checks that no test prompt
    is in train): tasks whose held-out items must stay fixed across seeds. The
    remaining arguments are the ``Task`` fields.
    """

    def decorate(builder: Builder) -> Builder:
        if not isinstance(name, str) or not name or name.endswith((".jsonl", ".json")) or "/" in name:
            raise ValueError(
                f"register_task({name!r}): a task name must be a non-empty string and not look like a path"
            )
        if name in TASKS:
            raise ValueError(f"register_task({name!r}): a task of that name is already registered")
        text = description
        if text is None:
            text = (builder.__doc__ or "").strip().splitlines()[0] if (builder.__doc__ or "").strip() else ""
        task = Task(
            name=name,
            prompt_template=prompt_template,
            answer_field=answer_field,
            metric=metric,
            label_field=label_field,
            description=text,
        )
        TASKS[name] = TaskSpec(task=task, builder=builder, splitter=splitter)
        return builder

    return decorate


def list_tasks() -> dict[str, str]:
    """Registered task names → one-line descriptions."""
    return {name: spec.task.description for name, spec in sorted(TASKS.items())}


# --------------------------------------------------------------------------- built-in tasks

ARITH_OPS: tuple[str, ...] = ("+", "-", "*")
"""The operations of ``arith``; the label is the index into this tuple."""

ARITH_MAX_OPERAND = 24


def _arith_records(num_examples: int, seed: int) -> dict[str, list[Any]]:
    rng = random.Random(seed)
    columns: dict[str, list[Any]] = {"a": [], "b": [], "op": [], "op_index": [], "result": []}
    for _ in range(num_examples):
        op_index = rng.randrange(len(ARITH_OPS))
        a, b = rng.randint(0, ARITH_MAX_OPERAND), rng.randint(0, ARITH_MAX_OPERAND)
        if ARITH_OPS[op_index] == "-" and a < b:
            a, b = b, a
        result = a + b if op_index == 0 else a - b if op_index == 1 else a * b
        for key, value in zip(columns, (a, b, ARITH_OPS[op_index], op_index, result), strict=True):
            columns[key].append(value)
    return columns


@register_task(
    "arith",
    metric="numeric",
    prompt_template="{a}{op}{b}=",
    answer_field="answer",
    label_field="op_index",
)
def build_arith(num_examples: int, seed: int) -> Dataset:
    """Small-integer arithmetic, '12+7=' -> '19' (label: the operation + - *)."""
    columns = _arith_records(num_examples, seed)
    columns["answer"] = [str(r) for r in columns["result"]]
    return Dataset.from_dict(columns)


@register_task(
    "json_arith",
    metric="exact_match",
    prompt_template="JSON: {a}{op}{b}=",
    answer_field="answer",
    label_field="op_index",
)
def build_json_arith(num_examples: int, seed: int) -> Dataset:
    """Arithmetic answered as JSON, 'JSON: 12+7=' -> '{"answer": 19}' (label: the operation)."""
    columns = _arith_records(num_examples, seed)
    columns["answer"] = [json.dumps({"answer": r}) for r in columns["result"]]
    return Dataset.from_dict(columns)


COPY_MIN_LEN, COPY_MAX_LEN = 3, 8


@register_task(
    "copy",
    metric="exact_match",
    prompt_template="Upper: {word}",
    answer_field="answer",
    label_field="length_bucket",
)
def build_copy(num_examples: int, seed: int) -> Dataset:
    """Copy a random word in upper case, 'Upper: abcde' -> 'ABCDE' (label: length bucket 3-4/5-6/7-8)."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(COPY_MIN_LEN, COPY_MAX_LEN)))
        for _ in range(num_examples)
    ]
    return Dataset.from_dict(
        {
            "word": words,
            "answer": [w.upper() for w in words],
            "length_bucket": [(len(w) - COPY_MIN_LEN) // 2 for w in words],
        }
    )


# --------------------------------------------------------------------------- loading


def _load_split(spec: TaskSpec, seed: int, num_train: int, num_test: int) -> tuple[Dataset, Dataset]:
    assert spec.splitter is not None
    raw_train, raw_test = spec.splitter(seed, num_train, num_test)
    train = dedup(spec.task.make_example(r) for r in raw_train.to_list())
    test = dedup(spec.task.make_example(r) for r in raw_test.to_list())
    overlap = {e["prompt"] for e in train} & {e["prompt"] for e in test}
    if overlap:
        raise ValueError(f"task {spec.task.name!r}: its splitter put {len(overlap)} test prompt(s) in train")
    if len(train) < num_train or len(test) < num_test:
        raise ValueError(
            f"task {spec.task.name!r} has only {len(train)} train / {len(test)} test items; "
            f"asked for num_train={num_train}, num_test={num_test}"
        )
    return to_dataset(train[:num_train]), to_dataset(test[:num_test])


def _load_registered(spec: TaskSpec, seed: int, num_train: int, num_test: int) -> tuple[Dataset, Dataset]:
    if spec.splitter is not None:
        return _load_split(spec, seed, num_train, num_test)
    needed = num_train + num_test
    draws = needed + needed // 2 + 16
    found, used = -1, 0
    for _ in range(4):
        used = draws
        examples = dedup(spec.task.make_example(r) for r in spec.build(used, seed).to_list())
        if len(examples) >= needed or len(examples) == found:  # enough, or no new prompt in twice the draws
            break
        found, draws = len(examples), draws * 2
    if len(examples) < needed:
        raise ValueError(
            f"task {spec.task.name!r} gave only {len(examples)} distinct prompts in {used} draws; "
            f"num_train + num_test = {num_train} + {num_test} = {needed} is too many"
        )
    examples = examples[:needed]
    random.Random(seed).shuffle(examples)
    return to_dataset(examples[num_test:]), to_dataset(examples[:num_test])


def _is_path_like(task: str) -> bool:
    return task.endswith((".jsonl", ".json")) or "/" in task or os.sep in task or Path(task).exists()


def _load_jsonl(path: str, seed: int, num_train: int, num_test: int) -> tuple[Task, Dataset, Dataset]:
    examples = [{**r, "label": 0} for r in dedup(read_alpaca_jsonl(path))]
    if len(examples) < 2:
        raise ValueError(f"JSONL task file {path!r} has {len(examples)} distinct prompt(s); train and test need >= 2")
    mean_words = sum(len(e["answer"].split()) for e in examples) / len(examples)
    metric: MetricName = "rouge_l" if mean_words > ROUGE_MIN_WORDS else "exact_match"
    task = Task(
        name=path,
        prompt_template="{prompt}",
        answer_field="answer",
        metric=metric,
        label_field=None,
        description=f"Alpaca-style JSONL {Path(path).name} ({len(examples)} records, {metric})",
    )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = min(num_test, max(1, int(len(examples) * JSONL_MAX_TEST_FRACTION)))
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test : n_test + num_train]]
    return task, to_dataset(train), to_dataset(test)


def load_task(
    task: str | os.PathLike[str], *, seed: int, num_train: int = 512, num_test: int = 64
) -> tuple[Task, Dataset, Dataset]:
    """Load a task as ``(task, train, test)``; both datasets have the columns ``prompt``, ``answer``, ``label``.

    ``task`` is a registered name (``list_tasks()``), a real dataset spec
    (``NAME[.OPTION][:PATH]``, see ``smartfed.data.real``), or the path of an
    Alpaca-style JSONL file (``read_alpaca_jsonl``). Prompts are deduplicated
    (first occurrence kept) before the split, so no test prompt is in train.

    Registered tasks: the builder draws examples from ``seed`` until there are
    ``num_train + num_test`` distinct prompts; the split is a shuffle by ``seed``.

    JSONL files: the test split takes ``num_test`` records but at most 20% of the
    file (at least one), chosen by a shuffle with ``seed``; train takes up to
    ``num_train`` of the rest. Label is 0. The metric is ``"rouge_l"`` when the
    answers average more than 3 words (free text), else ``"exact_match"``.

    Raises:
        ValueError: unknown task name (the message lists the registered ones),
            bad counts, a bad JSONL file (file and line named).
        FileNotFoundError: a JSONL path that does not exist.
    """
    seed = int(seed)
    num_train = check_count("num_train", num_train, 1)
    num_test = check_count("num_test", num_test, 0)
    name = os.fspath(task)
    if not isinstance(name, str):
        raise ValueError(f"load_task: task={task!r} must be a task name or a path")
    if parse_real_spec(name) is not None:  # a real dataset: "gsm8k:/data/gsm8k", "mgsm.es:...", ...
        return load_real_task(name, seed=seed, num_train=num_train, num_test=num_test)
    if name in TASKS:
        spec = TASKS[name]
        train, test = _load_registered(spec, seed, num_train, num_test)
        return spec.task, train, test
    if _is_path_like(name):
        return _load_jsonl(name, seed, num_train, num_test)
    raise ValueError(
        f"load_task: unknown task {name!r}; registered tasks: {sorted(TASKS)} "
        "(or give the path of an Alpaca-style .jsonl file)"
    )
