"""Prompts and answers → causal-LM training tensors with the loss on the answer only.

A training example is ``format_prompt(prompt) + answer + eos``: prompt and
answer are tokenized separately (so the model learns to continue exactly the
prompt tokens it will see in ``generate_answers``), the labels are ``-100`` on
the prompt and on padding, padding is on the right, and an example longer than
``max_length`` loses the *start* of its prompt, never its answer.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` (and transformers' causal-LM loss) skips."""

MAX_CHARS_PER_TOKEN = 32
"""Text beyond ``max_length × MAX_CHARS_PER_TOKEN`` characters cannot reach a kept token (a token of
more than 32 characters is rare), so it is cut before tokenizing: a 5 MB prompt costs what 4 KB does."""


def text_bound(max_length: int) -> int:
    """Characters of a prompt or answer worth tokenizing when ``max_length`` tokens are kept."""
    return max_length * MAX_CHARS_PER_TOKEN


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model sees before its answer.

    With a chat template: the prompt as a single user turn plus the generation
    prompt (``apply_chat_template(..., add_generation_prompt=True)``); without
    one: the prompt itself.
    """
    if not has_chat_template(tokenizer):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of ``format_prompt(tokenizer, prompt)``.

    A chat template writes its own special tokens, so the text is then
    tokenized with ``add_special_tokens=False``; a plain prompt gets the
    tokenizer's usual ones (e.g. a leading BOS), as at inference.
    """
    templated = has_chat_template(tokenizer)
    return list(tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not templated)["input_ids"])


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: ``pad_token_id``, else ``eos_token_id`` (many causal LMs have no pad)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad_token nor an eos_token")
    return int(pad)


def _eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; answers must end with one")
    return int(tokenizer.eos_token_id)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Tokenize prompt/answer pairs into one right-padded batch.

    Each row is ``encode_prompt(prompt) + answer ids + [eos]``, padded on the
    right to the longest row (at most ``max_length``) with ``pad_token_id``.
    ``labels`` equal ``input_ids`` on the answer and its eos and ``-100`` on the
    prompt and the padding. Too long: the prompt loses tokens from its left;
    an answer that alone does not fit in ``max_length - 1`` tokens is cut on the
    right (losing its eos) and keeps one prompt token. Only the last (first)
    ``text_bound(max_length)`` characters of a prompt (answer) are tokenized.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, int64 tensors of shape (batch, length).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"encode_examples: {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("encode_examples: no examples to encode")
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 2:
        raise ValueError(f"encode_examples: max_length={max_length!r} must be an int >= 2")
    eos, pad = _eos_token_id(tokenizer), pad_token_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    bound = text_bound(max_length)  # the prompt keeps its end, the answer its start: cut the text the same way
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = encode_prompt(tokenizer, prompt[-bound:])
        answer_ids = [*tokenizer(answer[:bound], add_special_tokens=False)["input_ids"], eos][: max_length - 1]
        rows.append((prompt_ids[-(max_length - len(answer_ids)) :], answer_ids))
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt_ids, answer_ids) in enumerate(rows):
        n_prompt, n_total = len(prompt_ids), len(prompt_ids) + len(answer_ids)
        input_ids[i, :n_total] = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        attention_mask[i, :n_total] = 1
        labels[i, n_prompt:n_total] = torch.tensor(answer_ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    max_length: int = 128,
) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``steps`` training batches of ``encode_examples``, reproducible from ``seed``.

    Example indices come from ``torch.randperm`` with a ``torch.Generator``
    seeded by ``seed``: one permutation per epoch, consumed in order, a new one
    when it runs out (a batch may straddle two epochs; a dataset smaller than
    ``batch_size`` repeats within a batch). Same dataset and seed → same batches.

    Args:
        dataset: a ``datasets.Dataset`` (or any mapping) with ``prompt`` and ``answer`` columns.
    """
    for name, value, minimum in (("batch_size", batch_size, 1), ("steps", steps, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"batches: {name}={value!r} must be an int >= {minimum}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"batches: seed={seed!r} must be an int")
    try:
        prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"batches: the dataset needs 'prompt' and 'answer' columns ({err})") from err
    if not prompts:
        raise ValueError("batches: the dataset is empty")
    generator = torch.Generator().manual_seed(int(seed))

    def iterate() -> Iterator[dict[str, torch.Tensor]]:
        order: list[int] = []
        position = 0
        for _ in range(steps):
            indices: list[int] = []
            while len(indices) < batch_size:
                if position == len(order):
                    order, position = torch.randperm(len(prompts), generator=generator).tolist(), 0
                take = min(batch_size - len(indices), len(order) - position)
                indices += order[position : position + take]
                position += take
            yield encode_examples(
                tokenizer, [prompts[i] for i in indices], [answers[i] for i in indices], max_length=max_length
            )

    return iterate()
