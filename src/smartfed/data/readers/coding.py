"""HumanEval and MBPP: Python problems scored by running the predicted code in the sandbox (pass@1).

* ``humaneval``: JSONL or JSONL.gz ``task_id``, ``prompt``, ``entry_point``,
  ``canonical_solution``, ``test``. Record: prompt = the code prompt, answer =
  canonical_solution (the body that continues the prompt); extra columns
  ``test``, ``entry_point``. Metric ``humaneval_pass_at_1``; Hub:
  openai/openai_humaneval.
* ``mbpp``: JSONL ``task_id``, ``text``, ``code``, ``test_list``,
  ``test_setup_code`` (or the sanitized JSON: ``prompt``, ``test_imports``).
  Record: prompt = text + the asserts (as in the MBPP paper), answer = code;
  extra columns ``test_list``, ``test_setup_code``, ``task_id``. One file
  holding both of the paper's task-id ranges is split by them (test 11–510,
  train 601–974). Metric ``mbpp_pass_at_1``; Hub: google-research-datasets/mbpp
  (full).
"""

from __future__ import annotations

import os
from typing import Any

from datasets import Value

from .base import (
    STR,
    STR_LIST,
    RealDataset,
    Record,
    Splits,
    check_file,
    get_str,
    hub_records,
    iter_records,
    no_option,
    read_split_files,
)

MBPP_TEST_IDS = range(11, 511)
MBPP_TRAIN_IDS = range(601, 975)
"""MBPP's task-id ranges of the paper's test and train splits (1–10: prompt, 511–600: validation)."""


def _humaneval_record(raw: dict[str, Any], where: str) -> Record:
    fields = {k: get_str(raw, k, where) for k in ("task_id", "prompt", "entry_point", "canonical_solution", "test")}
    if not fields["entry_point"].isidentifier():
        raise ValueError(f"{where}: field 'entry_point' is not a Python name: {fields['entry_point']!r}")
    return {
        "prompt": fields["prompt"],
        "answer": fields["canonical_solution"],
        "label": 0,
        "test": fields["test"],
        "entry_point": fields["entry_point"],
    }


def _mbpp_record(raw: dict[str, Any], where: str) -> Record:
    if "task_id" not in raw:
        raise ValueError(f"{where}: record has no 'task_id' field (fields: {sorted(raw)})")
    task_id = raw["task_id"]
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise ValueError(f"{where}: field 'task_id' must be an int, got {task_id!r}")
    text = get_str(raw, "text" if "text" in raw or "prompt" not in raw else "prompt", where)
    code = get_str(raw, "code", where)
    tests = raw.get("test_list")
    if "test_list" not in raw:
        raise ValueError(f"{where}: record has no 'test_list' field (fields: {sorted(raw)})")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise ValueError(f"{where}: field 'test_list' must be a non-empty list of strings, got {tests!r}"[:300])
    if "test_imports" in raw and "test_setup_code" not in raw:  # the sanitized MBPP format
        imports = raw["test_imports"]
        if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
            raise ValueError(f"{where}: field 'test_imports' must be a list of strings, got {imports!r}"[:300])
        setup = "\n".join(imports)
    else:
        setup = raw.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise ValueError(f"{where}: field 'test_setup_code' must be a string, got {setup!r}"[:300])
    prompt = f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests)
    return {
        "prompt": prompt,
        "answer": code,
        "label": 0,
        "test_list": list(tests),
        "test_setup_code": setup,
        "task_id": task_id,
    }


def read_humaneval(path: str | os.PathLike[str]) -> list[Record]:
    """HumanEval JSONL or JSONL.gz (``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test``)."""
    file = check_file(path, "HumanEval")
    return [_humaneval_record(raw, where) for where, raw in iter_records(file)]


def read_mbpp(path: str | os.PathLike[str]) -> list[Record]:
    """MBPP JSONL (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``) or the sanitized JSON."""
    file = check_file(path, "MBPP")
    return [_mbpp_record(raw, where) for where, raw in iter_records(file)]


def _mbpp_official(splits: Splits) -> Splits:
    """One MBPP file holding both paper ranges → the paper's train and test; otherwise unchanged."""
    if set(splits) != {"all"}:
        return splits
    records = splits["all"]
    test = [r for r in records if r["task_id"] in MBPP_TEST_IDS]
    train = [r for r in records if r["task_id"] in MBPP_TRAIN_IDS]
    return {"train": train, "test": test} if test and train else splits


HUMANEVAL = RealDataset(
    name="humaneval",
    description="HumanEval Python functions, pass@1 of the completion in the sandbox",
    metric=lambda option: "humaneval_pass_at_1",
    extra_features=lambda option: {"test": STR, "entry_point": STR},
    load_path=lambda path, option: read_split_files(
        path, (".jsonl", ".jsonl.gz", ".json"), "HumanEval", read_humaneval
    ),
    hub_id="openai/openai_humaneval",
    load_hub=lambda option: {"all": hub_records("openai/openai_humaneval", None, "test", _humaneval_record)},
    check_option=no_option("humaneval"),
)

MBPP = RealDataset(
    name="mbpp",
    description="MBPP basic Python problems, pass@1 of the code against its asserts in the sandbox",
    metric=lambda option: "mbpp_pass_at_1",
    extra_features=lambda option: {
        "test_list": STR_LIST,
        "test_setup_code": STR,
        "task_id": Value("int64"),
    },
    load_path=lambda path, option: _mbpp_official(read_split_files(path, (".jsonl", ".json"), "MBPP", read_mbpp)),
    hub_id="google-research-datasets/mbpp",
    load_hub=lambda option: {
        split: hub_records("google-research-datasets/mbpp", "full", split, _mbpp_record) for split in ("train", "test")
    },
    check_option=no_option("mbpp"),
)
