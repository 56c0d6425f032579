"""Alpaca-style JSONL files: ``instruction``, optional ``input``, ``output`` per line."""

from __future__ import annotations

import os
from pathlib import Path

from ..common import iter_jsonl_objects


def read_alpaca_jsonl(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read Alpaca-style records (``instruction``, optional ``input``, ``output``) from a JSONL file.

    Blank lines are skipped. Errors name the file and the 1-based line:
    ``FileNotFoundError`` when the file is missing, ``ValueError`` for bytes that
    are not UTF-8, a line that is not JSON, a line that is not a JSON object, a
    record without a string ``instruction``/``output`` (or with an empty
    instruction, or a non-string ``input``), and a file without any record.

    Returns:
        ``[{"prompt": ..., "answer": ...}]`` with prompt = instruction, plus
        ``"\\n\\n" + input`` when the input is non-empty, and answer = output.
    """
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"JSONL task file {str(file)!r} does not exist")
    if not file.is_file():
        raise ValueError(f"JSONL task file {str(file)!r} is not a regular file")
    records = []
    for where, record in iter_jsonl_objects(file.read_bytes(), file):
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"{where}: record has no {key!r} field (fields: {sorted(record)})")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {record[key]!r}")
        if not record["instruction"].strip():
            raise ValueError(f"{where}: field 'instruction' is empty")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"{where}: field 'input' must be a string, got {extra!r}")
        prompt = record["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
        records.append({"prompt": prompt, "answer": record["output"]})
    if not records:
        raise ValueError(f"JSONL task file {str(file)!r} holds no records (it is empty or only blank lines)")
    return records
