"""The paper's three skill-composition tasks: train on one dataset, test on another.

Wu, Li, Guo & Li, "Elastic Mixture of Rank-Wise Experts for Knowledge Reuse in
Federated Fine-Tuning" (2025) compose existing LoRAs on three tasks that no
single LoRA of the pool was trained for:

========== ============================== ============================================ ==================
task       LoRA pool (paper)              data, in the folder ``DATA``                 metric
========== ============================== ============================================ ==================
cn_math    Chinese chat + English math    train: every Math23K file of               ``final_number``
                                          ``DATA/math23k/`` (MWPToolkit JSON);
                                          test: ``DATA/mgsm/mgsm_zh.tsv`` (MGSM zh)
cn_code    Chinese chat + English code    ``DATA/doit/``: train\\*.jsonl and           ``mbpp_pass_at_1``
                                          test\\*.jsonl, or one file whose problems
                                          with ``test_list`` are the test pool
                                          (``readers.doit``)
math_code  English math + English code    train: every file of                         ``program_numeric``
                                          ``DATA/mathcodeinstruct/``
                                          (``readers.mathcode``); test: the
                                          GSM-Hard file of ``DATA/gsm_hard/``, PAL
                                          style (``gsm_hard.program``)
========== ============================== ============================================ ==================

Spec: ``NAME:DATA`` (``cn_math:/data``), where ``DATA`` is laid out as the
shared data folder (one sub-folder per dataset, named as the real datasets);
only the sub-folders a task reads need to be there. No Hub copy: a path is
needed. The records come from the readers of each dataset; a loader returns
``{"train", "test"}``, so ``load_real_task`` takes ``num_test`` test records
by a seeded shuffle and up to ``num_train`` training records whose prompt is
not in test (a DoIT problem drawn for test is never trained on).

Scores reuse the datasets' own metrics: MGSM's final number of the answer,
MBPP-style pass@1 of the code against the problem's asserts, and GSM-Hard's
execution of the predicted ``solution()`` in the sandbox (PAL). The training
answers differ from the test form where the paper's datasets do: Math23K
answers are plain values, MathCodeInstruct's solutions interleave text, code
and outputs while GSM-Hard asks for a ``solution()`` program.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from datasets import Value

from .base import STR, STR_LIST, RealDataset, Record, Splits, data_files, no_option, read_split_files
from .doit import read_doit
from .gsm import read_gsm_hard
from .math23k import read_math23k
from .mathcode import read_mathcodeinstruct
from .mgsm import read_mgsm


def _sub(data: Path, name: str, task: str, holds: str) -> Path:
    """``data/name``, the folder of one dataset; errors say what the data folder must hold."""
    if not data.exists():
        raise FileNotFoundError(f"{task}: data folder {str(data)!r} does not exist")
    if not data.is_dir():
        raise ValueError(
            f"{task}: {str(data)!r} is a file; give the data folder that holds {name}/ ({holds}), e.g. {task}:/data"
        )
    folder = data / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{task}: {str(folder)!r} does not exist; the data folder must hold {name}/ ({holds})")
    return folder


def _read_all(
    folder: Path, suffixes: tuple[str, ...], what: str, reader: Callable[[Path], list[Record]]
) -> list[Record]:
    """The records of every data file of ``folder``, files in name order (every split is training data here)."""
    files = data_files(folder, suffixes)
    if not files:
        raise ValueError(f"{what} folder {str(folder)!r} has no data file ({', '.join(suffixes)})")
    return [record for file in files for record in reader(file)]


def _load_cn_math(data: Path, option: str | None) -> Splits:
    math23k = _sub(data, "math23k", "cn_math", "Math23K's MWPToolkit JSON files")
    mgsm = _sub(data, "mgsm", "cn_math", "MGSM's mgsm_zh.tsv")
    # no Math23K item is held out: the test set is another dataset (MGSM, translated GSM8K problems)
    train = _read_all(math23k, (".json", ".jsonl"), "Math23K", read_math23k)
    return {"train": train, "test": read_mgsm(mgsm / "mgsm_zh.tsv", "zh")}


def _load_cn_code(data: Path, option: str | None) -> Splits:
    doit = _sub(data, "doit", "cn_code", "DoIT's JSONL file(s), see smartfed.data.readers.doit")
    splits = read_split_files(doit, (".jsonl", ".json"), "DoIT", read_doit)
    if "all" in splits:  # one file: its tested problems are the test pool, the rest of them train too
        train = splits["all"]
        test = [r for r in train if r["test_list"]]
        if not test:
            raise ValueError(
                f"DoIT folder {str(doit)!r}: no problem has a 'test_list'; Pass@1 needs asserts to run "
                "(see smartfed.data.readers.doit)"
            )
        return {"train": train, "test": test}
    untested = [r for r in splits["test"] if not r["test_list"]]
    if untested:
        raise ValueError(
            f"{untested[0]['_where']}: a DoIT test problem needs a non-empty 'test_list' (Pass@1 runs its asserts)"
        )
    return splits


def _load_math_code(data: Path, option: str | None) -> Splits:
    mathcode = _sub(data, "mathcodeinstruct", "math_code", "MathCodeInstruct's train_80k.jsonl")
    gsm_hard = _sub(data, "gsm_hard", "math_code", "GSM-Hard's gsmhardv2.jsonl")
    train = _read_all(mathcode, (".jsonl", ".jsonl.gz", ".json"), "MathCodeInstruct", read_mathcodeinstruct)
    # GSM-Hard's column: the execution metric reads the target; training answers have none
    train = [{**record, "target": None} for record in train]
    splits = read_split_files(gsm_hard, (".jsonl",), "GSM-Hard", lambda f: read_gsm_hard(f, program=True))
    return {"train": train, "test": splits["test"] if "test" in splits else splits["all"]}


CN_MATH = RealDataset(
    name="cn_math",
    description="paper task: Chinese math reasoning, train Math23K, test MGSM zh (DATA/math23k, DATA/mgsm)",
    metric=lambda option: "final_number",
    extra_features=lambda option: {},
    load_path=_load_cn_math,
    hub_id=None,
    load_hub=None,
    check_option=no_option("cn_math"),
)

CN_CODE = RealDataset(
    name="cn_code",
    description="paper task: Chinese code generation, DoIT, pass@1 on its asserts (DATA/doit)",
    metric=lambda option: "mbpp_pass_at_1",
    extra_features=lambda option: {"test_list": STR_LIST, "test_setup_code": STR},
    load_path=_load_cn_code,
    hub_id=None,
    load_hub=None,
    check_option=no_option("cn_code"),
)

MATH_CODE = RealDataset(
    name="math_code",
    description="paper task: hard math, train MathCodeInstruct, test GSM-Hard PAL (DATA/mathcodeinstruct, DATA/gsm_hard)",
    metric=lambda option: "program_numeric",
    extra_features=lambda option: {"target": Value("float64")},
    load_path=_load_math_code,
    hub_id=None,
    load_hub=None,
    check_option=no_option("math_code"),
)
