"""Real datasets from local files (or Hub ids where a hub is reachable), normalised to SmartFed's columns.

Every reader returns a list of records ``{"prompt": str, "answer": str, "label":
int}`` plus the extra columns a metric needs; ``load_real_task(spec, ...)``
returns ``(task, train, test)`` like ``tasks.load_task``.

Spec syntax: ``NAME[.OPTION][:PATH]``

* ``gsm8k:/data/gsm8k`` — a folder (its split files are used) or one file
  (split by the seed). ``PATH`` may contain ``:`` and ``/``.
* ``gsm8k`` — no path: the Hub id in the table below through
  ``datasets.load_dataset`` (no hub here: the error says to pass a path).
* ``OPTION`` picks a variant: ``gsm8k.cot``, ``gsm_hard.program``,
  ``mgsm.es`` or ``mgsm.es,fr,de`` (languages).

========== =============================================== ========================== ========================
name       local format                                    metric                     Hub id
========== =============================================== ========================== ========================
gsm8k      JSONL ``question``, ``answer`` (rationale,      ``final_number``           openai/gsm8k (main)
           ``#### N``); folder: train.jsonl + test.jsonl
gsm_hard   JSONL ``input``, ``code`` (``solution()``),     ``final_number``;          reasoning-machines/
           ``target`` (float)                              ``.program``:              gsm-hard
                                                           ``program_numeric``
mgsm       TSV per language ``mgsm_xx.tsv``, no header,    ``final_number``           juletxara/mgsm
           question TAB answer (csv ``QUOTE_NONE``)
math23k    MWPToolkit JSON list ``original_text``,         ``math_value``             none: a path is needed
           ``ans``; folder: \\*trainset/\\*validset/
           \\*testset.json
dolly      JSONL ``instruction``, ``context``,             ``rouge_l``                databricks/
           ``response``, ``category``                                                 databricks-dolly-15k
humaneval  JSONL or JSONL.gz ``task_id``, ``prompt``,      ``humaneval_pass_at_1``    openai/openai_humaneval
           ``entry_point``, ``canonical_solution``,
           ``test``
mbpp       JSONL ``task_id``, ``text``, ``code``,          ``mbpp_pass_at_1``         google-research-datasets/
           ``test_list``, ``test_setup_code`` (or the                                 mbpp (full)
           sanitized JSON: ``prompt``, ``test_imports``)
cn_math    folder: ``math23k/`` (train, every file) and    ``final_number``           none: a path is needed
           ``mgsm/mgsm_zh.tsv`` (test)
cn_code    folder: ``doit/`` (DoIT JSONL ``instruction``,  ``mbpp_pass_at_1``         none: a path is needed
           ``output``, ``test_list``)
math_code  folder: ``mathcodeinstruct/`` (train) and       ``program_numeric``        none: a path is needed
           ``gsm_hard/`` (test, PAL)
========== =============================================== ========================== ========================

``cn_math``, ``cn_code`` and ``math_code`` are the paper's skill-composition
tasks (Wu, Li, Guo & Li 2025): each trains on one dataset and tests on another,
read from one data folder laid out as the shared data folder
(``cn_math:/data``); ``smartfed.data.readers.paper`` has the layouts.

Records, per dataset: the docstring of its module in ``smartfed.data.readers``
(``gsm``, ``mgsm``, ``math23k``, ``dolly``, ``coding``, ``mathcode``, ``doit``,
``paper``). The readers
(``read_gsm8k``, ...) and the table ``REAL_DATASETS`` live there and are
re-exported here; this module parses specs and makes the splits.

Label is 0 where a dataset has no natural category.

Splits: a folder with train and test files (GSM8K; Math23K's trainset and
testset, or validset as train when there is no trainset) uses them, and so do
the paper's tasks (train from one dataset, test from another); MBPP's
full file (or Hub copy) uses the paper's task-id ranges (test 11–510, train
601–974); everything else is split by a shuffle with the seed. MGSM's parallel
translations are split by problem, so no problem is in train in one language
and in test in another. Test takes ``num_test`` records (a seeded shuffle of the
test file, or of the records; a seeded split keeps at least one problem for
train) and train up to ``num_train`` of the rest. Prompts are deduplicated and
no test prompt is in train.

Bad input raises ``FileNotFoundError`` (missing path) or ``ValueError`` naming
the file and the 1-based line (JSONL, TSV) or the 0-based record index (JSON).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from datasets import Dataset, Features

from .common import FEATURES, MetricName, Task, check_count, dedup, to_dataset
from .readers import (
    DOLLY_CATEGORIES,
    MBPP_TEST_IDS,
    MBPP_TRAIN_IDS,
    MGSM_LANGUAGES,
    PROGRAM_INSTRUCTION,
    REAL_DATASETS,
    RealDataset,
    Record,
    Splits,
    list_real_datasets,
    parse_math_value,
    read_doit,
    read_dolly,
    read_gsm8k,
    read_gsm_hard,
    read_humaneval,
    read_math23k,
    read_mathcodeinstruct,
    read_mbpp,
    read_mgsm,
)

__all__ = [
    "DOLLY_CATEGORIES",
    "MBPP_TEST_IDS",
    "MBPP_TRAIN_IDS",
    "MGSM_LANGUAGES",
    "PROGRAM_INSTRUCTION",
    "REAL_DATASETS",
    "REAL_METRICS",
    "RealDataset",
    "RealSpec",
    "RealTask",
    "Record",
    "Splits",
    "list_real_datasets",
    "load_real_task",
    "parse_math_value",
    "parse_real_spec",
    "read_doit",
    "read_dolly",
    "read_gsm8k",
    "read_gsm_hard",
    "read_humaneval",
    "read_math23k",
    "read_mathcodeinstruct",
    "read_mbpp",
    "read_mgsm",
]

REAL_METRICS: tuple[str, ...] = (
    "final_number",
    "math_value",
    "humaneval_pass_at_1",
    "mbpp_pass_at_1",
    "program_numeric",
)
"""Metric names of the real datasets beyond ``tasks.MetricName`` (defined in ``smartfed.eval.programs``)."""


# --------------------------------------------------------------------------- specs and loading


@dataclass(frozen=True)
class RealSpec:
    """A parsed ``NAME[.OPTION][:PATH]``; ``path`` None means the Hub."""

    name: str
    option: str | None
    path: str | None


_SPEC = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)(?:\.(?P<option>[A-Za-z0-9_,\-]+))?(?::(?P<path>.*))?$", re.DOTALL)


def parse_real_spec(spec: str | os.PathLike[str]) -> RealSpec | None:
    """``NAME[.OPTION][:PATH]`` → ``RealSpec``, or None when ``spec`` does not name a real dataset.

    None also for an existing path or a file name (``gsm8k.jsonl`` is an
    Alpaca-style file for ``load_task``, not the dataset ``gsm8k`` with option
    ``jsonl``), so that ``load_task`` goes on as before for those.

    Raises:
        ValueError: a real dataset's name with an unknown option or an empty path.
    """
    text = os.fspath(spec)
    if not isinstance(text, str):
        return None
    match = _SPEC.match(text)
    if match is None or match.group("name") not in REAL_DATASETS:
        return None
    path = match.group("path")
    if path is None and (os.path.exists(text) or text.endswith((".jsonl", ".json", ".gz", ".tsv"))):
        return None
    name, option = match.group("name"), match.group("option")
    if path is not None and not path.strip():
        raise ValueError(f"real task spec {text!r}: the path after ':' is empty")
    REAL_DATASETS[name].check_option(option)
    return RealSpec(name=name, option=option, path=path)


@dataclass(frozen=True)
class RealTask(Task):
    """A ``Task`` of a real dataset: its metric may be one of ``REAL_METRICS`` too.

    Attributes:
        source: the local path or the Hub id it was read from.
        extra_columns: the dataset's columns beyond ``prompt``, ``answer``, ``label``.
        split: how train and test were made: ``"given"`` (the dataset's own splits:
            split files, MBPP's task-id ranges, the Hub's splits) or ``"seeded"``.
    """

    source: str = ""
    extra_columns: tuple[str, ...] = ()
    split: str = "seeded"

    def __post_init__(self) -> None:
        allowed = (*get_args(MetricName), *REAL_METRICS)
        if self.metric not in allowed:
            raise ValueError(f"Task {self.name!r}: metric={self.metric!r} is not one of {list(allowed)}")
        # the base checks, with a metric the base class knows
        Task(
            name=self.name,
            prompt_template=self.prompt_template,
            answer_field=self.answer_field,
            metric="exact_match",
            label_field=self.label_field,
            description=self.description,
        )

    @property
    def record_metric(self) -> bool:
        """True when the metric needs whole records (``smartfed.eval.programs.RECORD_METRICS``)."""
        return self.metric in ("humaneval_pass_at_1", "mbpp_pass_at_1", "program_numeric")


def _seeded_split(records: list[Record], seed: int, num_train: int, num_test: int, what: str) -> tuple[list, list]:
    """Split by groups (``_group``, else the prompt) so that a group is never on both sides."""
    groups: dict[Any, list[Record]] = {}
    for record in dedup(records):
        groups.setdefault(record.get("_group", record["prompt"]), []).append(record)
    keys = list(groups)
    if len(keys) < 2:
        raise ValueError(f"{what}: {len(keys)} distinct problem(s); train and test need >= 2")
    random.Random(seed).shuffle(keys)
    test: list[Record] = []
    used = 0
    while len(test) < num_test and used < len(keys) - 1:
        test += groups[keys[used]]
        used += 1
    train = [r for k in keys[used:] for r in groups[k]]
    random.Random(seed + 1).shuffle(train)  # interleave the languages of a group
    test_prompts = {r["prompt"] for r in test}
    return dedup(train, test_prompts)[:num_train], test[:num_test]


def _given_split(splits: Splits, seed: int, num_train: int, num_test: int, what: str) -> tuple[list, list]:
    test = dedup(splits["test"])
    random.Random(seed).shuffle(test)
    test = test[:num_test]
    train = dedup(splits["train"], {r["prompt"] for r in test})
    random.Random(seed + 1).shuffle(train)
    if not train:
        raise ValueError(f"{what}: the train split has no record whose prompt is not in test")
    return train[:num_train], test


def load_real_task(
    spec: str | os.PathLike[str], *, seed: int, num_train: int = 512, num_test: int = 64
) -> tuple[RealTask, Dataset, Dataset]:
    """Load a real dataset named by ``NAME[.OPTION][:PATH]`` as ``(task, train, test)`` (module docstring).

    Both datasets have the columns ``prompt``, ``answer``, ``label`` and the
    dataset's extra columns (``task.extra_columns``).

    Raises:
        ValueError: not a real dataset spec (the message lists them), bad counts,
            a bad file (file and line or record named), a Hub failure (it says
            to pass a local path), too few records.
        FileNotFoundError: a path that does not exist.
    """
    parsed = parse_real_spec(spec)
    if parsed is None:
        raise ValueError(
            f"load_real_task: {os.fspath(spec)!r} is not a real dataset spec NAME[.OPTION][:PATH]; "
            f"datasets: {sorted(REAL_DATASETS)}"
        )
    seed = int(seed)
    num_train = check_count("num_train", num_train, 1)
    num_test = check_count("num_test", num_test, 0)
    dataset = REAL_DATASETS[parsed.name]
    label = f"{parsed.name}{'.' + parsed.option if parsed.option else ''}"
    if parsed.path is None:
        if dataset.load_hub is None or dataset.hub_id is None:
            raise ValueError(f"{label}: no Hub copy is known; give a local path as {label}:PATH")
        splits, source = dataset.load_hub(parsed.option), dataset.hub_id
    else:
        splits, source = dataset.load_path(Path(parsed.path).expanduser(), parsed.option), parsed.path
    if "all" in splits:
        train, test = _seeded_split(splits["all"], seed, num_train, num_test, f"{label} ({source})")
        how = "seeded"
    else:
        train, test = _given_split(splits, seed, num_train, num_test, f"{label} ({source})")
        how = "given"
    extra = dataset.extra_features(parsed.option)
    features = Features({**FEATURES, **extra})
    metric = dataset.metric(parsed.option)
    task = RealTask(
        name=os.fspath(spec),
        prompt_template="{prompt}",
        answer_field="answer",
        metric=metric,  # type: ignore[arg-type]  (RealTask accepts REAL_METRICS too)
        label_field="label",
        description=f"{dataset.description} [{source}; split: {how}; {metric}]",
        source=source,
        extra_columns=tuple(extra),
        split=how,
    )
    return task, to_dataset(train, features), to_dataset(test, features)
