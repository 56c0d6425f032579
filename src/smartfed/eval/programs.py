"""Metrics of the real datasets: final-answer numbers, Math23K values, and programs run in the sandbox.

Two kinds of metric, both per example with values in [0, 1]:

* **Answer metrics** ``(pred, ref) -> float``, the signature of
  ``metrics.METRICS``, in ``ANSWER_METRICS`` (kept out of ``METRICS`` itself,
  which stays in step with ``tasks.MetricName``):

  - ``"final_number"`` (GSM8K, GSM-Hard, MGSM): the *final* number of the
    prediction (after the last ``####``, else after the last "answer is", else
    the last number in the text; "答案是", "la respuesta es", "la réponse est" and
    "die Antwort ist" count as "answer is") against the reference's number.
  - ``"math_value"`` (Math23K): the final value of the prediction, where
    fractions (``7/15``, ``((7)/(15))``), mixed numbers (``19((3)/(4))``) and
    percentages (``25%`` = 0.25) count, against the reference's value.

* **Record metrics** ``(pred, record) -> float`` need more of the example than
  the reference answer (the unit tests, the target of a program), so they live
  in the parallel registry ``RECORD_METRICS``. ``score_records(metric, preds,
  records)`` scores any metric of the three registries (an answer metric gets
  ``record["answer"]``):

  - ``"humaneval_pass_at_1"``: the completion plus HumanEval's ``test`` and
    ``check(entry_point)`` run in the sandbox; 1.0 when it exits cleanly.
  - ``"mbpp_pass_at_1"``: the code plus ``test_setup_code`` and every assert
    of ``test_list``.
  - ``"program_numeric"`` (GSM-Hard, PAL style): the predicted program's
    ``solution()`` is run in the sandbox; 1.0 when it returns ``target``
    within ``PROGRAM_ABS_TOL``.

A prediction wrapped in a Markdown code fence is unwrapped first (the first
fenced block). One greedy answer per problem, so pass@1 is the mean of the
per-problem results. Nothing untrusted is ever evaluated in this process: every
program goes through ``smartfed.eval.sandbox.run_python``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..data.readers.math23k import parse_math_value
from .metrics import METRICS, NUMERIC_ABS_TOL, NUMERIC_REL_TOL
from .sandbox import run_python
from .solve import extract_code

PROGRAM_TIMEOUT_S = 5.0
"""Wall-clock seconds a program (tests included) may run."""

PROGRAM_MEMORY_MB = 512
PROGRAM_ABS_TOL = 1e-3
"""A PAL program is right when ``abs(solution() - target) < 1e-3`` (PAL's own check)."""

MATH_ABS_TOL = 1e-4
MATH_REL_TOL = 1e-6
"""Math23K values match within ``math.isclose(abs_tol=1e-4, rel_tol=1e-6)``."""

_RESULT_MARK = "@@smartfed-result@@"

# As metrics._NUMBER: a sign, digits with optional thousands separators, a decimal part, an exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
# "The answer is 18", and the same in MGSM's and Math23K's larger languages
_ANSWER_IS = re.compile(
    r"answer\s*(?:is|:)|答案\s*[是为:：]|respuesta\s*(?:es|:)|réponse\s*(?:est|:)|Antwort\s*(?:ist|lautet|:)",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- answer metrics


def _final_span(text: str) -> str:
    """The part of ``text`` holding its final answer: after the last ``####`` or "answer is", else all."""
    if "####" in text:
        return text.rsplit("####", 1)[1]
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        tail = text[matches[-1].end() :]
        if _NUMBER.search(tail):
            return tail
    return text


def final_number(text: str) -> float | None:
    """The final answer of a worked solution as a float, or None when there is no number.

    After the last ``####`` (GSM8K's marker) the first number is taken, likewise
    after the last "answer is"/"answer:"; otherwise the last number of the text.
    Thousands separators are dropped (``"2,125"`` → 2125.0).
    """
    span = _final_span(text)
    found = _NUMBER.findall(span)
    if not found:
        return None
    token = found[0] if span is not text else found[-1]
    try:
        value = float(token.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def final_number_match(pred: str, ref: str) -> float:
    """1.0 when ``final_number(pred)`` equals ``final_number(ref)`` (tolerances as ``numeric``), else 0.0."""
    a, b = final_number(pred), final_number(ref)
    if a is None or b is None:
        return 0.0
    return float(math.isclose(a, b, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL))


_MATH_TOKEN = re.compile(
    r"[-+]?\d+\s*\(\(\d+\)/\(\d+\)\)"  # mixed number 19((3)/(4))
    r"|\(\(?[-+]?\d+(?:\.\d+)?\)?/\(?\d+(?:\.\d+)?\)?\)"  # ((7)/(15)) or (7/15)
    r"|[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?\s*%?"  # 1,234.5  7/15  25%
)


def final_math_value(text: str) -> float | None:
    """The final value of a predicted Math23K answer: the last number, fraction or percentage in it.

    After ``####`` or "answer is" the first such token counts instead of the last.
    """
    span = _final_span(text)
    tokens = _MATH_TOKEN.findall(span)
    if not tokens:
        return None
    return parse_math_value(tokens[0] if span is not text else tokens[-1])


def math_value_match(pred: str, ref: str) -> float:
    """1.0 when the final value of ``pred`` equals the value of ``ref`` (``parse_math_value``), else 0.0."""
    target = parse_math_value(ref)
    if target is None:
        target = final_math_value(ref)
    value = final_math_value(pred)
    if value is None or target is None:
        return 0.0
    return float(math.isclose(value, target, rel_tol=MATH_REL_TOL, abs_tol=MATH_ABS_TOL))


# --------------------------------------------------------------------------- programs


def _field(record: Mapping[str, Any], key: str, metric: str) -> Any:
    if key not in record:
        raise ValueError(f"{metric}: the record has no {key!r} field (fields: {sorted(record)})")
    return record[key]


def _function_body(completion: str) -> str:
    """A completion that continues a function, cut before its first line at column 0.

    Codex's stop sequences (``\\ndef``, ``\\nclass``, ``\\nif``, ``\\nprint``, ``\\n#``) in
    one rule: whatever the model writes after the body (a test call, another
    function) is not part of the answer. No canonical HumanEval body has such a line.
    """
    lines = completion.split("\n")
    for index, line in enumerate(lines[1:], start=1):
        if line and not line[0].isspace():
            return "\n".join(lines[:index]) + "\n"
    return completion


def humaneval_program(completion: str, record: Mapping[str, Any]) -> str:
    """The program that checks a HumanEval completion: prompt + completion, the tests, ``check(entry_point)``.

    A completion that defines the entry-point function itself (a chat model's
    whole function) is appended after the prompt's stub instead of continuing
    it, so the prompt's imports and helpers still apply.  Otherwise the completion
    continues the prompt and is cut before its first line at column 0
    (``_function_body``).
    """
    prompt = str(_field(record, "prompt", "humaneval"))
    test = str(_field(record, "test", "humaneval"))
    entry_point = str(_field(record, "entry_point", "humaneval"))
    code = extract_code(completion)
    if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        # "pass" closes the prompt's stub (valid after its docstring), the completion then redefines it
        body = prompt.rstrip("\n") + "\n    pass\n\n" + code
    else:
        body = prompt + _function_body(code)
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(code: str, record: Mapping[str, Any]) -> str:
    """The program that checks MBPP code: ``test_setup_code``, the code, then every assert of ``test_list``."""
    tests = _field(record, "test_list", "mbpp")
    if isinstance(tests, str) or not isinstance(tests, Sequence) or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"mbpp: test_list must be a list of strings, got {tests!r}")
    setup = record.get("test_setup_code") or ""
    return f"{setup}\n{extract_code(code)}\n\n" + "\n".join(tests) + "\n"


def pass_at_1_humaneval(completion: str, record: Mapping[str, Any], *, timeout: float = PROGRAM_TIMEOUT_S) -> float:
    """1.0 when the completion passes the problem's tests in the sandbox, else 0.0 (see ``humaneval_program``)."""
    result = run_python(humaneval_program(completion, record), timeout=timeout, memory_mb=PROGRAM_MEMORY_MB)
    return float(result.ok)


def pass_at_1_mbpp(code: str, record: Mapping[str, Any], *, timeout: float = PROGRAM_TIMEOUT_S) -> float:
    """1.0 when the code passes every assert of ``test_list`` in the sandbox, else 0.0."""
    result = run_python(mbpp_program(code, record), timeout=timeout, memory_mb=PROGRAM_MEMORY_MB)
    return float(result.ok)


def execute_solution(program: str, *, timeout: float = PROGRAM_TIMEOUT_S) -> float | None:
    """Run a PAL-style program in the sandbox and return ``float(solution())``, or None.

    None when the program does not define ``solution``, fails, times out, or
    returns something ``float()`` refuses (or a NaN/infinity). Whatever the
    program prints itself is ignored.
    """
    code = extract_code(program)
    runner = (
        f"{code}\n\n"
        "def __smartfed_report():\n"
        "    value = float(solution())\n"
        f"    print({_RESULT_MARK!r} + repr(value))\n"
        "__smartfed_report()\n"
    )
    result = run_python(runner, timeout=timeout, memory_mb=PROGRAM_MEMORY_MB)
    if not result.ok:
        return None
    lines = [line for line in result.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if not lines:
        return None
    try:
        value = float(lines[-1][len(_RESULT_MARK) :])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def program_numeric(program: str, record: Mapping[str, Any], *, timeout: float = PROGRAM_TIMEOUT_S) -> float:
    """1.0 when the program's ``solution()`` returns ``record["target"]`` within ``PROGRAM_ABS_TOL``, else 0.0."""
    target = _field(record, "target", "program_numeric")
    try:
        target = float(target)
    except (TypeError, ValueError) as err:
        raise ValueError(f"program_numeric: target={target!r} is not a number") from err
    value = execute_solution(program, timeout=timeout)
    return float(value is not None and abs(value - target) < PROGRAM_ABS_TOL)


# --------------------------------------------------------------------------- registries

ANSWER_METRICS: dict[str, Callable[[str, str], float]] = {
    "final_number": final_number_match,
    "math_value": math_value_match,
}
"""Metric name → per-example function ``(pred, ref) -> float`` of the real datasets, beside ``METRICS``."""

RECORD_METRICS: dict[str, Callable[[str, Mapping[str, Any]], float]] = {
    "humaneval_pass_at_1": pass_at_1_humaneval,
    "mbpp_pass_at_1": pass_at_1_mbpp,
    "program_numeric": program_numeric,
}
"""Metric name → per-example function ``(pred, record) -> float`` in [0, 1] that needs the whole record."""


def per_example_scores(
    metric: str,
    preds: Sequence[str],
    records: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    *,
    workers: int = 1,
) -> list[float]:
    """Per-example scores of ``preds`` under ``metric`` (a ``RECORD_METRICS``, ``ANSWER_METRICS`` or ``METRICS`` name).

    Args:
        records: the examples, as a list of row mappings or as columns (a
            ``datasets.Dataset`` or a dict of lists); an answer metric reads
            their ``answer`` field.
        workers: sandboxed programs run at once for a record metric (threads
            that each wait on one subprocess); 1 runs them one by one.

    Raises:
        ValueError: unknown metric (the message lists the known ones), lengths that differ.
    """
    rows = _rows(records)
    if len(preds) != len(rows):
        raise ValueError(f"per_example_scores: {len(preds)} predictions but {len(rows)} records")
    if metric in RECORD_METRICS:
        record_fn = RECORD_METRICS[metric]
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"per_example_scores: workers={workers!r} must be an int >= 1")
        if workers == 1 or len(rows) < 2:
            return [float(record_fn(p, r)) for p, r in zip(preds, rows, strict=True)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return [float(x) for x in pool.map(record_fn, preds, rows)]
    answer_fn = ANSWER_METRICS.get(metric) or METRICS.get(metric)
    if answer_fn is not None:
        return [float(answer_fn(p, str(_field(r, "answer", metric)))) for p, r in zip(preds, rows, strict=True)]
    raise ValueError(f"unknown metric {metric!r}; known metrics: {sorted(known_metrics())}")


def known_metrics() -> set[str]:
    """Every metric name ``score_records`` accepts."""
    return {*METRICS, *ANSWER_METRICS, *RECORD_METRICS}


def score_records(
    metric: str,
    preds: Sequence[str],
    records: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    *,
    workers: int = 1,
) -> float:
    """Mean of ``per_example_scores``; like ``metrics.score`` but for either kind of metric.

    Raises:
        ValueError: unknown metric, lengths that differ, or no pairs at all.
    """
    scores = per_example_scores(metric, preds, records, workers=workers)
    if not scores:
        raise ValueError(f"score_records({metric!r}): no predictions to score")
    return sum(scores) / len(scores)


def _rows(records: Any) -> list[Mapping[str, Any]]:
    if hasattr(records, "to_list") and callable(records.to_list):  # a datasets.Dataset
        return list(records.to_list())
    if isinstance(records, Mapping):
        columns = {k: list(v) for k, v in records.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"records: columns of different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return list(records)
