"""Evaluation for SmartFed: greedy generation and answer metrics."""

from .generate import evaluate_task, generate_answers
from .metrics import METRICS, exact_match, first_number, numeric_match, rouge_l, score

__all__ = [
    "METRICS",
    "evaluate_task",
    "exact_match",
    "first_number",
    "generate_answers",
    "numeric_match",
    "rouge_l",
    "score",
]
