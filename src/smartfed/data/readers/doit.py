"""DoIT: Chinese code-generation instructions, the data of the paper's ``cn_code`` task.

Wu, Li, Guo & Li (2025) train ``cn_code`` on DoIT "expanded to 20K" and report
Pass@1 on DoIT. Neither DoIT nor the 20K expansion is public yet (the paper's
repository lists both as to be released), so their format could not be
confirmed. This reader takes a documented simple format instead, an Alpaca
record with MBPP's tests, so that any release can be converted to it line by
line:

Local format: JSONL (or a JSON list), one problem per line:

* ``instruction`` (str, required): the task, in Chinese;
* ``input`` (str, optional): appended after a blank line, as Alpaca;
* ``output`` (str, required): the reference solution (code, in a Markdown
  fence or not, with or without an explanation);
* ``test_list`` (list of str, optional): assert statements the solution must
  pass, as MBPP; a problem without them can only be trained on;
* ``test_setup_code`` (str, optional): run before the code, as MBPP.

Record: prompt = instruction (+ input), followed for a tested problem by
``TESTS_HEADER`` and its asserts (they name the function to write, as in the
MBPP paper's prompt); answer = output; label 0; extra columns ``test_list``
(empty for untested problems) and ``test_setup_code``. Scored with
``mbpp_pass_at_1`` (setup, the predicted code, every assert, in the sandbox).
"""

from __future__ import annotations

import os
from typing import Any

from .base import Record, check_file, get_str, iter_records

TESTS_HEADER = "\n你的代码需要通过以下测试：\n"
"""Put between a tested problem and its asserts: MBPP's "Your code should pass these tests:", in Chinese."""


def _tests(raw: dict[str, Any], where: str) -> list[str]:
    tests = raw.get("test_list")
    if tests is None:
        return []
    if not isinstance(tests, list) or not all(isinstance(t, str) and t.strip() for t in tests):
        raise ValueError(f"{where}: field 'test_list' must be a list of non-empty strings, got {tests!r}"[:300])
    return list(tests)


def _doit_record(raw: dict[str, Any], where: str) -> Record:
    instruction = get_str(raw, "instruction", where)
    extra = raw.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError(f"{where}: field 'input' must be a string, got {extra!r}"[:300])
    setup = raw.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise ValueError(f"{where}: field 'test_setup_code' must be a string, got {setup!r}"[:300])
    tests = _tests(raw, where)
    prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    if tests:
        prompt += TESTS_HEADER + "\n".join(tests)
    return {
        "prompt": prompt,
        "answer": get_str(raw, "output", where),
        "label": 0,
        "test_list": tests,
        "test_setup_code": setup,
        "_where": where,  # names the line when a test split turns out to hold an untested problem
    }


def read_doit(path: str | os.PathLike[str]) -> list[Record]:
    """DoIT JSONL (``instruction``, ``output``, optional ``input``, ``test_list``, ``test_setup_code``) → records."""
    file = check_file(path, "DoIT")
    return [_doit_record(raw, where) for where, raw in iter_records(file)]
