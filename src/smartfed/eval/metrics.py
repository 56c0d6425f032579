"""Answer metrics: exact match, numeric match, ROUGE-L, JSON answers and program values, each in [0, 1] per example.

``score(metric, preds, refs)`` is the mean over examples; ``METRICS`` maps the
names a ``Task`` uses (``"exact_match"``, ``"numeric"``, ``"rouge_l"``,
``"json_answer"``, ``"program_value"``) to the per-example functions.
``"program_value"`` runs the predicted program in the sandbox
(``smartfed.eval.solve``); the others only read text.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from .solve import ProgramError, reference_value, run_solve

NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-6

# An optional sign, digits with optional thousands separators ("1,234"), an optional
# decimal part, or a bare decimal (".5"); an optional exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when ``pred`` and ``ref`` are equal after stripping and collapsing whitespace runs, else 0.0.

    Case and punctuation count (``"ABC"`` is not ``"abc"``; JSON keys must match).
    """
    return float(_normalise(pred) == _normalise(ref))


def first_number(text: str) -> float | None:
    """The first number in ``text`` (``"-1,234.5"`` → -1234.5), or None when there is none."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        value = float(match.group().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numeric_match(pred: str, ref: str) -> float:
    """1.0 when the first number of ``pred`` equals the first number of ``ref``, else 0.0.

    ``"The answer is 19."`` matches ``"19"``; numbers are compared as floats
    (``math.isclose`` with rel/abs tolerance 1e-6, so ``"19.0"`` matches ``"19"``).
    0.0 when either text has no number.
    """
    a, b = first_number(pred), first_number(ref)
    if a is None or b is None:
        return 0.0
    return float(math.isclose(a, b, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL))


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:  # rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure of ``pred`` against ``ref`` (Google's ``rouge-score`` package, no stemming).

    ``rouge-score`` lower-cases and keeps only ``[a-z0-9]`` tokens, so text
    without such characters (other scripts, pure punctuation) scores 0.0 —
    except two texts that are both empty after stripping, which score 1.0.
    """
    if not pred.strip() and not ref.strip():
        return 1.0
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)


def _json_answer_value(text: str) -> object:
    """The ``"answer"`` of the first JSON object in ``text`` (a missing key gives a sentinel)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    if not isinstance(obj, dict) or "answer" not in obj:
        raise ValueError("no 'answer' key")
    return obj["answer"]


def json_answer(pred: str, ref: str) -> float:
    """1.0 when ``pred`` holds a JSON object whose ``"answer"`` equals the reference object's, else 0.0.

    The form skill of the default benchmark (docs/design.md §7): ``{"answer": 68}``
    matches ``{ "answer" : 68 }`` and ``{"answer": 68.0}`` (numbers compare with
    the tolerance of ``numeric_match``), but not ``68``, ``{"answer": "68"}``
    or invalid JSON. Text after the object is ignored.
    """
    try:
        got, want = _json_answer_value(pred), _json_answer_value(ref)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return 0.0
    return float(same_value(got, want))


def same_value(got: object, want: object) -> bool:
    """Two answer values are the same: numbers (not bools) within the ``numeric`` tolerances, else equal and of one type."""
    numbers = (int, float)
    if (
        isinstance(got, numbers)
        and isinstance(want, numbers)
        and not isinstance(got, bool)
        and not isinstance(want, bool)
    ):
        return math.isclose(got, want, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL)
    return type(got) is type(want) and got == want


def program_value(pred: str, ref: str) -> float:
    """1.0 when the predicted program's ``solve()``, run in the sandbox, returns the reference program's value.

    The ``code`` skill and ``code_math`` (``smartfed.data.composite``): ``ref`` is
    ``def solve():\n    return 68``; ``return 68``, ``return 23 + 45`` and
    ``return 68.0`` are right, ``return '68'``, a program that raises, loops past
    ``solve.SOLVE_TIMEOUT_S`` or has no ``solve`` score 0.0 (``smartfed.eval.solve``).

    Raises:
        ValueError: the reference itself returns no value (a broken task, not a wrong answer).
    """
    try:
        want = reference_value(ref)
    except ProgramError as err:
        raise ValueError(f"program_value: the reference program {ref!r} returns no value ({err})") from err
    try:
        got = run_solve(pred)
    except ProgramError:
        return 0.0
    return float(same_value(got, want))


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "numeric": numeric_match,
    "rouge_l": rouge_l,
    "json_answer": json_answer,
    "program_value": program_value,
}
"""Metric name → per-example function ``(pred, ref) -> float`` in [0, 1]."""


def score(metric: str, preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean of ``METRICS[metric](pred, ref)`` over the pairs.

    Raises:
        ValueError: unknown metric (the message lists the known ones), lengths
            that differ, or no pairs at all.
    """
    if metric not in METRICS:
        raise ValueError(f"score: unknown metric {metric!r}; known metrics: {sorted(METRICS)}")
    if len(preds) != len(refs):
        raise ValueError(f"score: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError(f"score({metric!r}): no predictions to score")
    fn = METRICS[metric]
    return sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds)
