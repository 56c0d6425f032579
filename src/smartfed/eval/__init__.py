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

from .programs import (  # appended: real-dataset metrics
    ANSWER_METRICS,
    RECORD_METRICS,
    execute_solution,
    pass_at_1_humaneval,
    pass_at_1_mbpp,
    per_example_scores,
    score_records,
)
from .sandbox import SandboxResult, network_isolation, run_python, sandbox_isolation

__all__ += [
    "ANSWER_METRICS",
    "RECORD_METRICS",
    "SandboxResult",
    "execute_solution",
    "network_isolation",
    "pass_at_1_humaneval",
    "pass_at_1_mbpp",
    "per_example_scores",
    "run_python",
    "sandbox_isolation",
    "score_records",
]
