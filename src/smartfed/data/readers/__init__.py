"""Readers of real datasets, one module per family, and the table ``REAL_DATASETS`` of them.

* ``gsm``: GSM8K and GSM-Hard; ``mgsm``: MGSM; ``math23k``: Math23K;
  ``dolly``: Dolly-15k; ``coding``: HumanEval and MBPP; ``alpaca``: Alpaca-style
  JSONL files (``load_task``'s path form, not a real dataset of the table).
* ``mathcode``: MathCodeInstruct; ``doit``: DoIT (read by the paper's tasks,
  not datasets of the table themselves); ``paper``: the paper's three
  skill-composition tasks ``cn_math``, ``cn_code``, ``math_code``, each training
  on one dataset and testing on another.
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
from .doit import read_doit
from .dolly import DOLLY, DOLLY_CATEGORIES, read_dolly
from .gsm import GSM8K, GSM_HARD, PROGRAM_INSTRUCTION, read_gsm8k, read_gsm_hard
from .math23k import MATH23K, parse_math_value, read_math23k
from .mathcode import read_mathcodeinstruct
from .mgsm import MGSM, MGSM_LANGUAGES, read_mgsm
from .paper import CN_CODE, CN_MATH, MATH_CODE


def _table(*entries: RealDataset) -> dict[str, RealDataset]:
    table: dict[str, RealDataset] = {}
    for dataset in entries:
        if dataset.name in table:
            raise ValueError(f"real dataset {dataset.name!r} is already registered")
        table[dataset.name] = dataset
    return table


REAL_DATASETS: dict[str, RealDataset] = _table(
    GSM8K, GSM_HARD, MGSM, MATH23K, DOLLY, HUMANEVAL, MBPP, CN_MATH, CN_CODE, MATH_CODE
)
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
    "read_doit",
    "read_dolly",
    "read_gsm8k",
    "read_gsm_hard",
    "read_humaneval",
    "read_math23k",
    "read_mathcodeinstruct",
    "read_mbpp",
    "read_mgsm",
]
