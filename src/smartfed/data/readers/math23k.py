"""Math23K: Chinese math word problems in MWPToolkit's JSON list.

Local format: a JSON list of ``original_text``, ``ans``; a folder holds
\\*trainset / \\*validset / \\*testset.json (validset is train when there is no
trainset). Record: prompt = original_text, answer = the value of ``ans`` as a
plain number (``"((7)/(15))"`` → ``"0.4666666667"``, ``"25%"`` → ``"0.25"``,
``"19((3)/(4))"`` → ``"19.75"``; kept as written when it does not parse).
Metric ``math_value``; no Hub copy is known (a path is needed).
"""

from __future__ import annotations

import ast
import math
import operator
import os
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from .base import RealDataset, Record, check_file, format_number, get_str, iter_records, no_option, read_split_files

_ARITH_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_MIXED = re.compile(r"^([-+]?\d+)\s*(\(\(?\s*\d+\s*\)?\s*/\s*\(?\s*\d+\s*\)?\))$")


def _arith(node: ast.AST) -> Fraction:
    """Value of a small arithmetic expression (numbers, + - * /, unary signs, parentheses); ValueError otherwise."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arith(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH_OPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _ARITH_OPS[type(node.op)](left, right)
    raise ValueError(f"not plain arithmetic: {ast.dump(node)[:60]}")


def parse_math_value(text: str) -> float | None:
    """A Math23K-style answer as a float, or None when it is not one.

    ``"9"`` → 9.0, ``"1.5"``, ``"((7)/(15))"`` or ``"7/15"`` → 0.4667, ``"19((3)/(4))"``
    (a mixed number) → 19.75, ``"25%"`` → 0.25, ``"112.5%"`` → 1.125. Thousands
    separators are dropped. Parsed with ``ast`` (numbers and + - * / only),
    never evaluated as Python.
    """
    if not isinstance(text, str):
        return None
    body = text.strip().replace(",", "").replace("（", "(").replace("）", ")").replace("÷", "/").replace("×", "*")
    percent = body.endswith("%")
    if percent:
        body = body[:-1].strip()
    if not body or len(body) > 200:
        return None
    try:
        mixed = _MIXED.match(body)
        if mixed:
            whole, frac = Fraction(int(mixed.group(1))), _arith(ast.parse(mixed.group(2), mode="eval"))
            value = whole - frac if whole < 0 or mixed.group(1).startswith("-") else whole + frac
        else:
            value = _arith(ast.parse(body, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    result = float(value / 100 if percent else value)
    return result if math.isfinite(result) else None


def _math23k_record(raw: dict[str, Any], where: str) -> Record:
    question = get_str(raw, "original_text", where)
    if "ans" not in raw:
        raise ValueError(f"{where}: record has no 'ans' field (fields: {sorted(raw)})")
    ans = raw["ans"]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)) or not str(ans).strip():
        raise ValueError(f"{where}: field 'ans' must be a non-empty string or a number, got {ans!r}")
    value = parse_math_value(str(ans))
    return {"prompt": question, "answer": str(ans).strip() if value is None else format_number(value), "label": 0}


def read_math23k(path: str | os.PathLike[str]) -> list[Record]:
    """Math23K in MWPToolkit's JSON list (``original_text``, ``ans``) → records with numeric answers."""
    file = check_file(path, "Math23K")
    return [_math23k_record(raw, where) for where, raw in iter_records(file)]


MATH23K = RealDataset(
    name="math23k",
    description="Math23K Chinese math word problems (MWPToolkit JSON), numeric value answer",
    metric=lambda option: "math_value",
    extra_features=lambda option: {},
    load_path=lambda path, option: read_split_files(path, (".json", ".jsonl"), "Math23K", read_math23k),
    hub_id=None,
    load_hub=None,
    check_option=no_option("math23k"),
)
