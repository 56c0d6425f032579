"""MathCodeInstruct: math problems with solutions that interleave text, code and execution results.

The training data of the paper's ``math_code`` task (Wu, Li, Guo & Li 2025:
hard math-word problems, trained on MathCodeInstruct, tested on GSM-Hard).
MathCodeInstruct is the instruction set of Wang et al., "MathCoder: Seamless
Code Integration in LLMs for Enhanced Mathematical Reasoning" (ICLR 2024),
released as the Hugging Face dataset MathLLMs/MathCodeInstruct
(``train_80k.jsonl``).

Local format: JSONL (or a JSON list), one conversation per line under
``messages``: ``{"role": "system" | "user" | "assistant", "content": [block,
...]}`` with blocks ``{"type": "text" | "code" | "execution", "content":
str}``. This is the schema of the MathCoder repository's own files
(mathllm/MathCoder ``data/*_post.jsonl`` and the messages its
``src/inference.py`` writes); the 80K file itself could not be read from here.
Two more forms are read, for data converted by hand: a message whose
``content`` is a plain string (the OpenAI chat form) is one text block, and a
line without ``messages`` is an ``instruction`` / ``output`` pair (optional
``input``, as Alpaca).

Record: prompt = the text of the first user message (the system message is
dropped: the run's chat template and the task's prompt take its place); answer
= the assistant messages after it, text blocks as written, code blocks fenced
as Python and execution results fenced as ``output``, joined by blank lines;
label 0. No metric of its own: ``math_code`` (``readers.paper``) is scored on
GSM-Hard.
"""

from __future__ import annotations

import os
from typing import Any

from .base import Record, check_file, get_str, iter_records

BLOCK_FENCES: dict[str, str] = {"code": "python", "execution": "output"}
"""Block type → the Markdown fence it is written in (text blocks are not fenced)."""


def _block(raw: object, where: str) -> str:
    """One content block as text: text as written, code and execution results fenced."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a content block must be a JSON object, got {raw!r}"[:300])
    kind = get_str(raw, "type", where)
    if kind != "text" and kind not in BLOCK_FENCES:
        raise ValueError(f"{where}: unknown block type {kind!r}; MathCodeInstruct has 'text', 'code', 'execution'")
    # an execution may print nothing; an empty block carries no text either way
    body = get_str(raw, "content", where, allow_empty=True)
    if kind == "text":
        return body.strip()
    fenced = body.strip("\n")
    return f"```{BLOCK_FENCES[kind]}\n{fenced}\n```"


def _message_text(message: object, where: str) -> tuple[str, str]:
    """``(role, text)`` of one message; its content is a list of blocks or a plain string."""
    if not isinstance(message, dict):
        raise ValueError(f"{where}: a message must be a JSON object, got {message!r}"[:300])
    role = get_str(message, "role", where)
    if "content" not in message:
        raise ValueError(f"{where}: message has no 'content' field (fields: {sorted(message)})")
    content = message["content"]
    if isinstance(content, str):
        return role, content.strip()
    if not isinstance(content, list):
        raise ValueError(f"{where}: field 'content' must be a list of blocks or a string, got {content!r}"[:300])
    blocks = [_block(block, f"{where} block {i}") for i, block in enumerate(content)]
    return role, "\n\n".join(b for b in blocks if b)


def _conversation(messages: object, where: str) -> tuple[str, str]:
    """``(question, solution)``: the first user message and the assistant messages after it."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list, got {messages!r}"[:300])
    turns = [_message_text(m, f"{where} messages[{i}]") for i, m in enumerate(messages)]
    roles = [role for role, _ in turns]
    if "user" not in roles:
        raise ValueError(f"{where}: no message with role 'user' (roles: {roles})")
    first_user = roles.index("user")
    question = turns[first_user][1]
    solution = "\n\n".join(text for role, text in turns[first_user + 1 :] if role == "assistant" and text)
    if not question:
        raise ValueError(f"{where}: the user message is empty")
    if not solution:
        raise ValueError(f"{where}: no non-empty 'assistant' message after the user message (roles: {roles})")
    return question, solution


def _simple_pair(raw: dict[str, Any], where: str) -> tuple[str, str]:
    """``(question, solution)`` of a hand-converted ``instruction`` / ``input`` / ``output`` line."""
    if "instruction" not in raw:
        raise ValueError(
            f"{where}: record has neither 'messages' (MathCodeInstruct) nor 'instruction'/'output' "
            f"(fields: {sorted(raw)})"
        )
    instruction = get_str(raw, "instruction", where)
    extra = raw.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError(f"{where}: field 'input' must be a string, got {extra!r}"[:300])
    return instruction + (f"\n\n{extra}" if extra.strip() else ""), get_str(raw, "output", where)


def _mathcode_record(raw: dict[str, Any], where: str) -> Record:
    if "messages" in raw:
        question, solution = _conversation(raw["messages"], where)
    else:
        question, solution = _simple_pair(raw, where)
    return {"prompt": question, "answer": solution, "label": 0}


def read_mathcodeinstruct(path: str | os.PathLike[str]) -> list[Record]:
    """MathCodeInstruct JSONL (``messages`` with text/code/execution blocks) → records (module docstring)."""
    file = check_file(path, "MathCodeInstruct")
    return [_mathcode_record(raw, where) for where, raw in iter_records(file)]
