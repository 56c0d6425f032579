"""Readers of real datasets, one module per family, and the table ``REAL_DATASETS`` of them.

* ``gsm``: GSM8K and GSM-Hard; ``mgsm``: MGSM; ``math23k``: Math23K;
  ``dolly``: Dolly-15k; ``coding``: HumanEval and MBPP; ``alpaca``: Alpaca-style
  JSONL files (``load_task``'s path form, not a real dataset of the table).
* ``base``: what they share (file reading, field checks, split files, the Hub,
  ``RealDataset``).

Each family module reads local files (``read_*``) and the Hub, and defines its
``RealDataset`` entries; ``smartfed.data.real`` parses the specs that name them
(``NAME[.OPTION][:PATH]``, its docstring has the formats) and splits the records.
This package imports nothing of ``smartfed.data`` but ``smartfed.data.common``.
"""

from __future__ import annotations

from .alpaca import read_alpaca_jsonl
from .base import RealDataset, Record, Splits
from .coding import HUMANEVAL, MBPP, MBPP_TEST_IDS, MBPP_TRAIN_IDS, read_humaneval, read_mbpp
from .dolly import DOLLY, DOLLY_CATEGORIES, read_dolly
from .gsm import GSM8K, GSM_HARD, PROGRAM_INSTRUCTION, read_gsm8k, read_gsm_hard
from .math23k import MATH23K, parse_math_value, read_math23k
from .mgsm import MGSM, MGSM_LANGUAGES, read_mgsm


def _table(*entries: RealDataset) -> dict[str, RealDataset]:
    table: dict[str, RealDataset] = {}
    for dataset in entries:
        if dataset.name in table:
            raise ValueError(f"real dataset {dataset.name!r} is already registered")
        table[dataset.name] = dataset
    return table


REAL_DATASETS: dict[str, RealDataset] = _table(GSM8K, GSM_HARD, MGSM, MATH23K, DOLLY, HUMANEVAL, MBPP)
"""Real dataset name → ``RealDataset``; ``load_real_task`` reads specs naming these."""


def list_real_datasets() -> dict[str, str]:
    """Real dataset names → one-line descriptions."""
    return {name: d.description for name, d in sorted(REAL_DATASETS.items())}


__all__ = [
    "DOLLY_CATEGORIES",
    "MBPP_TEST_IDS",
    "MBPP_TRAIN_IDS",
    "MGSM_LANGUAGES",
    "PROGRAM_INSTRUCTION",
    "REAL_DATASETS",
    "RealDataset",
    "Record",
    "Splits",
    "list_real_datasets",
    "parse_math_value",
    "read_alpaca_jsonl",
    "read_dolly",
    "read_gsm8k",
    "read_gsm_hard",
    "read_humaneval",
    "read_math23k",
    "read_mbpp",
    "read_mgsm",
]
