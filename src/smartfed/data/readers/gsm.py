"""GSM8K and GSM-Hard: grade-school math with a numeric final answer.

* ``gsm8k``: JSONL ``question``, ``answer`` (the rationale, then ``#### N``); a
  folder holds train.jsonl + test.jsonl. Record: prompt = question, answer = the
  number after ``####`` (thousands separators dropped), extra column
  ``rationale`` (the text before ``####``). ``gsm8k.cot``: answer = the
  rationale without the ``<<...>>`` calculator notes, then ``#### N``. Metric
  ``final_number``; Hub: openai/gsm8k (main).
* ``gsm_hard``: JSONL ``input``, ``code`` (``solution()``), ``target`` (float).
  Record: prompt = input, answer = the target (``"-9867630"``; an integral float
  loses its ``.0``), extra column ``target`` (float). ``gsm_hard.program``:
  prompt = input + ``PROGRAM_INSTRUCTION``, answer = the reference program,
  scored by running the predicted program (PAL, ``program_numeric``). Hub:
  reasoning-machines/gsm-hard.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from datasets import Value

from .base import (
    STR,
    RealDataset,
    Record,
    check_file,
    format_number,
    get_str,
    hub_records,
    iter_jsonl,
    number_text,
    one_option,
    read_split_files,
)

PROGRAM_INSTRUCTION = "\n\nWrite a Python function solution() that returns the answer."
"""Appended to the question of ``gsm_hard.program``."""

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _gsm8k_record(raw: dict[str, Any], where: str, *, cot: bool = False) -> Record:
    question = get_str(raw, "question", where)
    solution = get_str(raw, "answer", where)
    if "####" not in solution:
        raise ValueError(f"{where}: field 'answer' has no '#### N' final answer: {solution[-80:]!r}")
    rationale, final = solution.rsplit("####", 1)
    number = number_text(final, where, "answer (after ####)")
    answer = f"{_CALCULATOR.sub('', rationale).strip()}\n#### {number}" if cot else number
    return {"prompt": question, "answer": answer, "label": 0, "rationale": rationale.strip()}


def _gsm_hard_record(raw: dict[str, Any], where: str, *, program: bool = False) -> Record:
    question = get_str(raw, "input", where)
    code = get_str(raw, "code", where)
    if "target" not in raw:
        raise ValueError(f"{where}: record has no 'target' field (fields: {sorted(raw)})")
    target = raw["target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"{where}: field 'target' must be a finite number, got {target!r}")
    if program:
        return {
            "prompt": question + PROGRAM_INSTRUCTION,
            "answer": code.strip("\n") + "\n",
            "label": 0,
            "target": float(target),
        }
    return {"prompt": question, "answer": format_number(float(target)), "label": 0, "target": float(target)}


def read_gsm8k(path: str | os.PathLike[str], *, cot: bool = False) -> list[Record]:
    """GSM8K JSONL (``question``, ``answer`` = rationale then ``#### N``) → records (see the module docstring)."""
    file = check_file(path, "GSM8K")
    return [_gsm8k_record(raw, where, cot=cot) for where, raw in iter_jsonl(file)]


def read_gsm_hard(path: str | os.PathLike[str], *, program: bool = False) -> list[Record]:
    """GSM-Hard JSONL (``input``, ``code``, ``target``) → records; ``program=True``: the PAL variant."""
    file = check_file(path, "GSM-Hard")
    return [_gsm_hard_record(raw, where, program=program) for where, raw in iter_jsonl(file)]


GSM8K = RealDataset(
    name="gsm8k",
    description="GSM8K grade-school math, numeric final answer (.cot: answer with the worked rationale)",
    metric=lambda option: "final_number",
    extra_features=lambda option: {"rationale": STR},
    load_path=lambda path, option: read_split_files(
        path, (".jsonl",), "GSM8K", lambda f: read_gsm8k(f, cot=option == "cot")
    ),
    hub_id="openai/gsm8k",
    load_hub=lambda option: {
        split: hub_records("openai/gsm8k", "main", split, lambda r, w: _gsm8k_record(r, w, cot=option == "cot"))
        for split in ("train", "test")
    },
    check_option=one_option("gsm8k", "cot"),
)

GSM_HARD = RealDataset(
    name="gsm_hard",
    description="GSM-Hard (GSM8K test with large numbers), numeric answer (.program: PAL, run solution())",
    metric=lambda option: "program_numeric" if option == "program" else "final_number",
    extra_features=lambda option: {"target": Value("float64")},
    load_path=lambda path, option: read_split_files(
        path, (".jsonl",), "GSM-Hard", lambda f: read_gsm_hard(f, program=option == "program")
    ),
    hub_id="reasoning-machines/gsm-hard",
    load_hub=lambda option: {
        "all": hub_records(
            "reasoning-machines/gsm-hard",
            None,
            "train",
            lambda r, w: _gsm_hard_record(r, w, program=option == "program"),
        )
    },
    check_option=one_option("gsm_hard", "program"),
)
