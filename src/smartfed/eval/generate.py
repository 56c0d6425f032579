"""Greedy answers from a causal LM and the task score of those answers.

Prompts go through the same ``encode_prompt`` as training (chat template when
the tokenizer has one), are left-padded so that every row ends where its answer
starts, and are decoded from the new tokens only, up to the first eos.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..data.collate import encode_prompt, pad_token_id
from ..data.common import Task
from .programs import per_example_scores


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"generate_answers: {name}={value!r} must be an int >= 1")


def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to ``prompts``, in order.

    Each prompt is ``encode_prompt(tokenizer, prompt)``; a batch is padded on
    the left by hand with ``pad_token_id(tokenizer)`` (the tokenizer's own
    ``padding_side`` and pad token are neither used nor changed, so this works
    for tokenizers without a pad token). The model runs in eval mode (its
    training mode is restored afterwards) with ``do_sample=False, num_beams=1``.
    Each answer is decoded from the generated tokens only, cut at the first eos,
    special tokens skipped.

    Args:
        model: anything with a transformers-style ``generate(input_ids=...,
            attention_mask=..., max_new_tokens=..., ...)`` returning token ids
            (or an output with ``.sequences``) that start with the input.
        max_new_tokens: cap on each answer's tokens.
        batch_size: prompts per ``generate`` call.
    """
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("batch_size", batch_size)
    if isinstance(prompts, str):
        raise ValueError("generate_answers: prompts must be a list of strings, not one string")
    if not prompts:
        return []
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for i, ids in enumerate(encoded):
                input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[i, width - len(ids) :] = 1
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=int(max_new_tokens),
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            sequences = getattr(output, "sequences", output)
            for row in sequences[:, width:].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return answers


def evaluate_task(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    dataset: Any,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    limit: int | None = None,
    items: bool = False,
) -> dict[str, Any]:
    """Score the model's greedy answers on ``dataset`` with ``task.metric``.

    Args:
        dataset: a ``datasets.Dataset`` (or mapping) with ``prompt`` and ``answer`` columns.
        limit: score only the first ``limit`` rows (None: all).
        items: also return ``"items"``, the per-row scores in dataset order (what paired
            comparisons and item-resampled intervals need).

    Returns:
        ``{"score": mean metric in [0, 1], "n": rows scored}``, both floats (the
        metric's name is ``task.metric``), and ``"items"`` when asked. An empty dataset gives
        ``{"score": 0.0, "n": 0.0}``, which weighs nothing in an n-weighted mean.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 0):
        raise ValueError(f"evaluate_task: limit={limit!r} must be an int >= 0 or None")
    try:
        prompts, refs = list(dataset["prompt"]), list(dataset["answer"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"evaluate_task: the dataset needs 'prompt' and 'answer' columns ({err})") from err
    if limit is not None:
        prompts, refs = prompts[:limit], refs[:limit]
    if not prompts:
        return {"score": 0.0, "n": 0.0}
    preds = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = dataset.select(range(len(prompts))) if hasattr(dataset, "select") else dataset
    # record-aware metrics (pass@1, program execution) read the rows' extra columns
    scores = per_example_scores(task.metric, preds, rows)
    result: dict[str, Any] = {"score": sum(scores) / len(scores), "n": float(len(prompts))}
    if items:
        result["items"] = [float(x) for x in scores]
    return result
