"""Dolly-15k: open instructions with free-text answers, scored with ROUGE-L.

Local format: JSONL ``instruction``, ``context``, ``response``, ``category``.
Record: prompt = instruction, plus a blank line and the context when there is
one; answer = response; label = the category's index in ``DOLLY_CATEGORIES``
(unknown categories after those, in sorted order). Hub:
databricks/databricks-dolly-15k.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .base import RealDataset, Record, Splits, check_file, get_str, hub_rows, iter_records, no_option, read_split_files

DOLLY_CATEGORIES: tuple[str, ...] = (
    "open_qa",
    "general_qa",
    "classification",
    "closed_qa",
    "brainstorming",
    "information_extraction",
    "summarization",
    "creative_writing",
)
"""Dolly-15k's categories; a record's label is its category's index here."""


def _dolly_record(raw: dict[str, Any], where: str, categories: dict[str, int]) -> Record:
    instruction = get_str(raw, "instruction", where)
    context = raw.get("context") or ""
    if not isinstance(context, str):
        raise ValueError(f"{where}: field 'context' must be a string, got {context!r}"[:300])
    response = get_str(raw, "response", where)
    category = get_str(raw, "category", where)
    prompt = instruction + (f"\n\n{context}" if context.strip() else "")
    return {"prompt": prompt, "answer": response, "label": categories[category]}


def _dolly_categories(raws: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    categories = {c: i for i, c in enumerate(DOLLY_CATEGORIES)}
    unknown = sorted({r["category"] for _, r in raws if isinstance(r.get("category"), str)} - set(categories))
    categories.update({c: len(DOLLY_CATEGORIES) + i for i, c in enumerate(unknown)})
    return categories


def read_dolly(path: str | os.PathLike[str]) -> list[Record]:
    """Dolly-15k JSONL (``instruction``, ``context``, ``response``, ``category``) → records."""
    file = check_file(path, "Dolly")
    raws = list(iter_records(file))
    categories = _dolly_categories(raws)
    return [_dolly_record(raw, where, categories) for where, raw in raws]


def _load_dolly_hub(option: str | None) -> Splits:
    rows = [
        (f"databricks/databricks-dolly-15k[train] row {i}", r)
        for i, r in enumerate(hub_rows("databricks/databricks-dolly-15k", None, "train"))
    ]
    categories = _dolly_categories(rows)
    return {"all": [_dolly_record(r, w, categories) for w, r in rows]}


DOLLY = RealDataset(
    name="dolly",
    description="Dolly-15k open instructions, ROUGE-L (label: category)",
    metric=lambda option: "rouge_l",
    extra_features=lambda option: {},
    load_path=lambda path, option: read_split_files(path, (".jsonl", ".json"), "Dolly", read_dolly),
    hub_id="databricks/databricks-dolly-15k",
    load_hub=_load_dolly_hub,
    check_option=no_option("dolly"),
)
