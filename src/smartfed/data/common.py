"""What the task registry (``tasks``, ``real``) and the dataset readers (``readers``) share.

``Task`` (how records become prompts and answers, and how they are scored), the
columns every loaded dataset has (``COLUMNS``, ``FEATURES``), JSONL iteration
with errors that name the file and line, count checks, and the two helpers
every loader ends with: ``dedup`` (first example of every prompt) and
``to_dataset``. This module imports nothing else of ``smartfed.data``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from datasets import Dataset, Features, Value

MetricName = Literal["exact_match", "numeric", "rouge_l", "json_answer", "program_value"]

COLUMNS: tuple[str, ...] = ("prompt", "answer", "label")
"""The columns of every dataset ``load_task`` returns."""

FEATURES = Features({"prompt": Value("string"), "answer": Value("string"), "label": Value("int64")})
"""The features of ``COLUMNS``; real datasets add their extra columns to these."""


@dataclass(frozen=True)
class Task:
    """How the raw records of a task become prompts, answers and labels, and how answers are scored.

    Attributes:
        name: registry name (or the JSONL path it was loaded from).
        prompt_template: ``str.format`` template filled with the record's fields.
        answer_field: the record field holding the reference answer (cast to str).
        metric: a ``MetricName``: ``"exact_match"``, ``"numeric"``, ``"rouge_l"``, ``"json_answer"`` or
            ``"program_value"`` (see ``smartfed.eval.metrics``).
        label_field: the record field (ints) used for Dirichlet partitioning; None
            when the task has no label (every record gets label 0).
        description: one line for ``list_tasks`` and logs.
    """

    name: str
    prompt_template: str
    answer_field: str
    metric: MetricName
    label_field: str | None
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name={self.name!r} must be a non-empty string")
        if self.metric not in get_args(MetricName):
            raise ValueError(f"Task {self.name!r}: metric={self.metric!r} is not one of {list(get_args(MetricName))}")
        if not isinstance(self.prompt_template, str) or not self.prompt_template:
            raise ValueError(f"Task {self.name!r}: prompt_template={self.prompt_template!r} must be a non-empty string")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None]
        except ValueError as err:
            raise ValueError(
                f"Task {self.name!r}: prompt_template={self.prompt_template!r} is not a format string: {err}"
            ) from err
        if any(not f for f in fields):
            raise ValueError(
                f"Task {self.name!r}: prompt_template={self.prompt_template!r} has an unnamed field '{{}}'"
            )
        if not isinstance(self.answer_field, str) or not self.answer_field:
            raise ValueError(f"Task {self.name!r}: answer_field={self.answer_field!r} must be a non-empty string")
        if self.label_field is not None and (not isinstance(self.label_field, str) or not self.label_field):
            raise ValueError(f"Task {self.name!r}: label_field={self.label_field!r} must be a non-empty string or None")
        if not isinstance(self.description, str) or not self.description.strip():
            raise ValueError(f"Task {self.name!r}: description={self.description!r} must be a non-empty string")

    def make_prompt(self, record: dict[str, Any]) -> str:
        """Fill ``prompt_template`` with a record's fields."""
        try:
            return self.prompt_template.format(**record)
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"Task {self.name!r}: prompt_template={self.prompt_template!r} needs field {err} "
                f"missing from the record (fields: {sorted(record)})"
            ) from err

    def make_example(self, record: dict[str, Any]) -> dict[str, Any]:
        """One raw record → ``{"prompt": str, "answer": str, "label": int}``."""
        if self.answer_field not in record:
            raise ValueError(
                f"Task {self.name!r}: answer_field={self.answer_field!r} is not a field of the record "
                f"(fields: {sorted(record)})"
            )
        label = 0
        if self.label_field is not None:
            if self.label_field not in record:
                raise ValueError(
                    f"Task {self.name!r}: label_field={self.label_field!r} is not a field of the record "
                    f"(fields: {sorted(record)})"
                )
            label = record[self.label_field]
            if isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f"Task {self.name!r}: label_field={self.label_field!r} must hold ints, got {label!r}")
        return {"prompt": self.make_prompt(record), "answer": str(record[self.answer_field]), "label": int(label)}


def check_count(name: str, value: object, minimum: int) -> int:
    """``value`` when it is an int (not a bool) ``>= minimum``; else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"load_task: {name}={value!r} must be an int >= {minimum}")
    return value


def dedup(examples: Iterable[dict[str, Any]], exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Keep the first example of every prompt, and none whose prompt is in ``exclude``."""
    seen = set(exclude)
    unique = []
    for example in examples:
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            unique.append(example)
    return unique


def to_dataset(examples: list[dict[str, Any]], features: Features = FEATURES) -> Dataset:
    """Examples → a ``datasets.Dataset`` with exactly the columns of ``features`` (default ``FEATURES``)."""
    return Dataset.from_dict({c: [e[c] for e in examples] for c in features}, features=features)


def iter_jsonl_objects(data: bytes, file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every non-blank line of JSONL bytes; ``where`` is ``file:line``.

    Errors name the file and the 1-based line: bytes that are not UTF-8, a line
    that is not JSON, a line that is not a JSON object. A leading BOM is dropped.
    """
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{file}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start} of the line)") from err
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record
