"""Real datasets from local files (or Hub ids where a hub is reachable), normalised to SmartFed's columns.

Every reader returns a list of records ``{"prompt": str, "answer": str, "label":
int}`` plus the extra columns a metric needs; ``load_real_task(spec, ...)``
returns ``(task, train, test)`` like ``tasks.load_task``.

Spec syntax: ``NAME[.OPTION][:PATH]``

* ``gsm8k:/data/gsm8k`` — a folder (its split files are used) or one file
  (split by the seed). ``PATH`` may contain ``:`` and ``/``.
* ``gsm8k`` — no path: the Hub id in the table below through
  ``datasets.load_dataset`` (no hub here: the error says to pass a path).
* ``OPTION`` picks a variant: ``gsm8k.cot``, ``gsm_hard.program``,
  ``mgsm.es`` or ``mgsm.es,fr,de`` (languages).

========== =============================================== ========================== ========================
name       local format                                    metric                     Hub id
========== =============================================== ========================== ========================
gsm8k      JSONL ``question``, ``answer`` (rationale,      ``final_number``           openai/gsm8k (main)
           ``#### N``); folder: train.jsonl + test.jsonl
gsm_hard   JSONL ``input``, ``code`` (``solution()``),     ``final_number``;          reasoning-machines/
           ``target`` (float)                              ``.program``:              gsm-hard
                                                           ``program_numeric``
mgsm       TSV per language ``mgsm_xx.tsv``, no header,    ``final_number``           juletxara/mgsm
           question TAB answer (csv ``QUOTE_NONE``)
math23k    MWPToolkit JSON list ``original_text``,         ``math_value``             none: a path is needed
           ``ans``; folder: \\*trainset/\\*validset/
           \\*testset.json
dolly      JSONL ``instruction``, ``context``,             ``rouge_l``                databricks/
           ``response``, ``category``                                                 databricks-dolly-15k
humaneval  JSONL or JSONL.gz ``task_id``, ``prompt``,      ``humaneval_pass_at_1``    openai/openai_humaneval
           ``entry_point``, ``canonical_solution``,
           ``test``
mbpp       JSONL ``task_id``, ``text``, ``code``,          ``mbpp_pass_at_1``         google-research-datasets/
           ``test_list``, ``test_setup_code`` (or the                                 mbpp (full)
           sanitized JSON: ``prompt``, ``test_imports``)
========== =============================================== ========================== ========================

Records, per dataset:

* gsm8k: prompt = question, answer = the number after ``####`` (thousands
  separators dropped), extra column ``rationale`` (the text before ``####``).
  ``gsm8k.cot``: answer = the rationale without the ``<<...>>`` calculator
  notes, then ``#### N``.
* gsm_hard: prompt = input, answer = the target (``"-9867630"``; an integral
  float loses its ``.0``), extra column ``target`` (float). ``gsm_hard.program``:
  prompt = input + ``PROGRAM_INSTRUCTION``, answer = the reference program,
  scored by running the predicted program (PAL).
* mgsm: prompt = question, answer = the number; label = the language's index
  in ``MGSM_LANGUAGES`` (so a Dirichlet partition skews clients by language).
  The language comes from the file name ``mgsm_xx.tsv`` or the ``lang`` argument.
* math23k: prompt = original_text, answer = the value of ``ans`` as a plain
  number (``"((7)/(15))"`` → ``"0.4666666667"``, ``"25%"`` → ``"0.25"``,
  ``"19((3)/(4))"`` → ``"19.75"``; kept as written when it does not parse).
* dolly: prompt = instruction, plus a blank line and the context when there is
  one; answer = response; label = the category's index in ``DOLLY_CATEGORIES``
  (unknown categories after those, in sorted order).
* humaneval: prompt = the code prompt, answer = canonical_solution (the body
  that continues the prompt); extra columns ``test``, ``entry_point``.
* mbpp: prompt = text + the asserts (as in the MBPP paper), answer = code;
  extra columns ``test_list``, ``test_setup_code``, ``task_id``.

Label is 0 where a dataset has no natural category.

Splits: a folder with train and test files (GSM8K; Math23K's trainset and
testset, or validset as train when there is no trainset) uses them; MBPP's
full file (or Hub copy) uses the paper's task-id ranges (test 11–510, train
601–974); everything else is split by a shuffle with the seed. MGSM's parallel
translations are split by problem, so no problem is in train in one language
and in test in another. Test takes ``num_test`` records (a seeded shuffle of the
test file, or of the records; a seeded split keeps at least one problem for
train) and train up to ``num_train`` of the rest. Prompts are deduplicated and
no test prompt is in train.

Bad input raises ``FileNotFoundError`` (missing path) or ``ValueError`` naming
the file and the 1-based line (JSONL, TSV) or the 0-based record index (JSON).
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import math
import operator
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, get_args

import datasets
from datasets import Dataset, Features, Value

from .tasks import FEATURES, MetricName, Task, _check_count, iter_jsonl_objects

REAL_METRICS: tuple[str, ...] = (
    "final_number",
    "math_value",
    "humaneval_pass_at_1",
    "mbpp_pass_at_1",
    "program_numeric",
)
"""Metric names of the real datasets beyond ``tasks.MetricName`` (defined in ``smartfed.eval.programs``)."""

MGSM_LANGUAGES: tuple[str, ...] = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
"""MGSM's languages; a record's label is its language's index here."""

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

PROGRAM_INSTRUCTION = "\n\nWrite a Python function solution() that returns the answer."
"""Appended to the question of ``gsm_hard.program``."""

MBPP_TEST_IDS = range(11, 511)
MBPP_TRAIN_IDS = range(601, 975)
"""MBPP's task-id ranges of the paper's test and train splits (1–10: prompt, 511–600: validation)."""

_List: Any = getattr(datasets, "List", None) or datasets.Sequence

Record = dict[str, Any]


# --------------------------------------------------------------------------- low-level readers


def _check_file(path: str | os.PathLike[str], what: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{what} file {str(file)!r} does not exist")
    if not file.is_file():
        raise ValueError(f"{what} file {str(file)!r} is not a regular file")
    return file


def _read_text(file: Path) -> bytes:
    data = file.read_bytes()
    if file.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{file}: not a readable gzip file ({err})") from err
    return data


def _iter_jsonl(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every non-blank line (``.gz`` read transparently); ``where`` is ``file:line``."""
    found = False
    for where, record in iter_jsonl_objects(_read_text(file), file):
        found = True
        yield where, record
    if not found:
        raise ValueError(f"{file}: holds no records (it is empty or only blank lines)")


def _iter_json_list(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every element of a JSON list; ``where`` names the 0-based record index.

    A file that is not one JSON document is read as JSON lines instead.
    """
    try:
        text = _read_text(file).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):
            yield from _iter_jsonl(file)
            return
        raise ValueError(f"{file}: invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from err
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of objects, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{file}: holds no records (an empty list)")
    for index, record in enumerate(data):
        where = f"{file}: record index {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _iter_records(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    name = file.name[:-3] if file.name.endswith(".gz") else file.name
    return _iter_json_list(file) if name.endswith(".json") else _iter_jsonl(file)


def _get_str(record: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise ValueError(f"{where}: record has no {key!r} field (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {value!r}"[:300])
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def _format_number(value: float) -> str:
    """``18.0`` → ``"18"``, ``0.4666…`` → ``"0.4666666667"`` (10 significant digits)."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"


def _number_text(text: str, where: str, key: str) -> str:
    """A numeric answer without thousands separators; ValueError when it is not a number."""
    cleaned = text.strip().replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        raise ValueError(f"{where}: field {key!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: field {key!r} is not a finite number: {text!r}")
    return cleaned


# --------------------------------------------------------------------------- record normalisers

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _gsm8k_record(raw: dict[str, Any], where: str, *, cot: bool = False) -> Record:
    question = _get_str(raw, "question", where)
    solution = _get_str(raw, "answer", where)
    if "####" not in solution:
        raise ValueError(f"{where}: field 'answer' has no '#### N' final answer: {solution[-80:]!r}")
    rationale, final = solution.rsplit("####", 1)
    number = _number_text(final, where, "answer (after ####)")
    answer = f"{_CALCULATOR.sub('', rationale).strip()}\n#### {number}" if cot else number
    return {"prompt": question, "answer": answer, "label": 0, "rationale": rationale.strip()}


def _gsm_hard_record(raw: dict[str, Any], where: str, *, program: bool = False) -> Record:
    question = _get_str(raw, "input", where)
    code = _get_str(raw, "code", where)
    if "target" not in raw:
        raise ValueError(f"{where}: record has no 'target' field (fields: {sorted(raw)})")
    target = raw["target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"{where}: field 'target' must be a finite number, got {target!r}")
    if program:
        return {
            "prompt": question + PROGRAM_INSTRUCTION,
            "answer": code.strip("\n") + "\n",
            "label": 0,
            "target": float(target),
        }
    return {"prompt": question, "answer": _format_number(float(target)), "label": 0, "target": float(target)}


def _mgsm_record(question: str, answer: str, lang: str, where: str) -> Record:
    if not question.strip():
        raise ValueError(f"{where}: the question is empty")
    return {"prompt": question, "answer": _number_text(answer, where, "answer"), "label": MGSM_LANGUAGES.index(lang)}


_ARITH_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_MIXED = re.compile(r"^([-+]?\d+)\s*(\(\(?\s*\d+\s*\)?\s*/\s*\(?\s*\d+\s*\)?\))$")


def _arith(node: ast.AST) -> Fraction:
    """Value of a small arithmetic expression (numbers, + - * /, unary signs, parentheses); ValueError otherwise."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arith(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH_OPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _ARITH_OPS[type(node.op)](left, right)
    raise ValueError(f"not plain arithmetic: {ast.dump(node)[:60]}")


def parse_math_value(text: str) -> float | None:
    """A Math23K-style answer as a float, or None when it is not one.

    ``"9"`` → 9.0, ``"1.5"``, ``"((7)/(15))"`` or ``"7/15"`` → 0.4667, ``"19((3)/(4))"``
    (a mixed number) → 19.75, ``"25%"`` → 0.25, ``"112.5%"`` → 1.125. Thousands
    separators are dropped. Parsed with ``ast`` (numbers and + - * / only),
    never evaluated as Python.
    """
    if not isinstance(text, str):
        return None
    body = text.strip().replace(",", "").replace("（", "(").replace("）", ")").replace("÷", "/").replace("×", "*")
    percent = body.endswith("%")
    if percent:
        body = body[:-1].strip()
    if not body or len(body) > 200:
        return None
    try:
        mixed = _MIXED.match(body)
        if mixed:
            whole, frac = Fraction(int(mixed.group(1))), _arith(ast.parse(mixed.group(2), mode="eval"))
            value = whole - frac if whole < 0 or mixed.group(1).startswith("-") else whole + frac
        else:
            value = _arith(ast.parse(body, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    result = float(value / 100 if percent else value)
    return result if math.isfinite(result) else None


def _math23k_record(raw: dict[str, Any], where: str) -> Record:
    question = _get_str(raw, "original_text", where)
    if "ans" not in raw:
        raise ValueError(f"{where}: record has no 'ans' field (fields: {sorted(raw)})")
    ans = raw["ans"]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)) or not str(ans).strip():
        raise ValueError(f"{where}: field 'ans' must be a non-empty string or a number, got {ans!r}")
    value = parse_math_value(str(ans))
    return {"prompt": question, "answer": str(ans).strip() if value is None else _format_number(value), "label": 0}


def _dolly_record(raw: dict[str, Any], where: str, categories: dict[str, int]) -> Record:
    instruction = _get_str(raw, "instruction", where)
    context = raw.get("context") or ""
    if not isinstance(context, str):
        raise ValueError(f"{where}: field 'context' must be a string, got {context!r}"[:300])
    response = _get_str(raw, "response", where)
    category = _get_str(raw, "category", where)
    prompt = instruction + (f"\n\n{context}" if context.strip() else "")
    return {"prompt": prompt, "answer": response, "label": categories[category]}


def _humaneval_record(raw: dict[str, Any], where: str) -> Record:
    fields = {k: _get_str(raw, k, where) for k in ("task_id", "prompt", "entry_point", "canonical_solution", "test")}
    if not fields["entry_point"].isidentifier():
        raise ValueError(f"{where}: field 'entry_point' is not a Python name: {fields['entry_point']!r}")
    return {
        "prompt": fields["prompt"],
        "answer": fields["canonical_solution"],
        "label": 0,
        "test": fields["test"],
        "entry_point": fields["entry_point"],
    }


def _mbpp_record(raw: dict[str, Any], where: str) -> Record:
    if "task_id" not in raw:
        raise ValueError(f"{where}: record has no 'task_id' field (fields: {sorted(raw)})")
    task_id = raw["task_id"]
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise ValueError(f"{where}: field 'task_id' must be an int, got {task_id!r}")
    text = _get_str(raw, "text" if "text" in raw or "prompt" not in raw else "prompt", where)
    code = _get_str(raw, "code", where)
    tests = raw.get("test_list")
    if "test_list" not in raw:
        raise ValueError(f"{where}: record has no 'test_list' field (fields: {sorted(raw)})")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise ValueError(f"{where}: field 'test_list' must be a non-empty list of strings, got {tests!r}"[:300])
    if "test_imports" in raw and "test_setup_code" not in raw:  # the sanitized MBPP format
        imports = raw["test_imports"]
        if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
            raise ValueError(f"{where}: field 'test_imports' must be a list of strings, got {imports!r}"[:300])
        setup = "\n".join(imports)
    else:
        setup = raw.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise ValueError(f"{where}: field 'test_setup_code' must be a string, got {setup!r}"[:300])
    prompt = f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests)
    return {
        "prompt": prompt,
        "answer": code,
        "label": 0,
        "test_list": list(tests),
        "test_setup_code": setup,
        "task_id": task_id,
    }


# --------------------------------------------------------------------------- public readers


def read_gsm8k(path: str | os.PathLike[str], *, cot: bool = False) -> list[Record]:
    """GSM8K JSONL (``question``, ``answer`` = rationale then ``#### N``) → records (see the module docstring)."""
    file = _check_file(path, "GSM8K")
    return [_gsm8k_record(raw, where, cot=cot) for where, raw in _iter_jsonl(file)]


def read_gsm_hard(path: str | os.PathLike[str], *, program: bool = False) -> list[Record]:
    """GSM-Hard JSONL (``input``, ``code``, ``target``) → records; ``program=True``: the PAL variant."""
    file = _check_file(path, "GSM-Hard")
    return [_gsm_hard_record(raw, where, program=program) for where, raw in _iter_jsonl(file)]


_MGSM_FILE = re.compile(r"^mgsm_([a-z]{2})\.tsv$")


def _mgsm_language(file: Path, lang: str | None) -> str:
    if lang is None:
        match = _MGSM_FILE.match(file.name)
        if match is None:
            raise ValueError(
                f"MGSM file {str(file)!r}: cannot tell the language from the name (expected mgsm_xx.tsv); pass lang=..."
            )
        lang = match.group(1)
    if lang not in MGSM_LANGUAGES:
        raise ValueError(f"MGSM file {str(file)!r}: unknown language {lang!r}; MGSM has {list(MGSM_LANGUAGES)}")
    return lang


def read_mgsm(path: str | os.PathLike[str], lang: str | None = None) -> list[Record]:
    """One MGSM language file (TSV, no header: question TAB answer, csv ``QUOTE_NONE``) → records.

    The language (the label) is ``lang`` or, when None, the ``xx`` of ``mgsm_xx.tsv``.
    """
    file = _check_file(path, "MGSM")
    lang = _mgsm_language(file, lang)
    try:
        text = _read_text(file).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    records = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    for row in reader:
        where = f"{file}:{reader.line_num}"
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 2:
            raise ValueError(f"{where}: expected 2 tab-separated columns (question, answer), got {len(row)}")
        records.append(_mgsm_record(row[0], row[1], lang, where))
    if not records:
        raise ValueError(f"{file}: holds no records (it is empty or only blank lines)")
    return records


def read_math23k(path: str | os.PathLike[str]) -> list[Record]:
    """Math23K in MWPToolkit's JSON list (``original_text``, ``ans``) → records with numeric answers."""
    file = _check_file(path, "Math23K")
    return [_math23k_record(raw, where) for where, raw in _iter_records(file)]


def _dolly_categories(raws: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    categories = {c: i for i, c in enumerate(DOLLY_CATEGORIES)}
    unknown = sorted({r["category"] for _, r in raws if isinstance(r.get("category"), str)} - set(categories))
    categories.update({c: len(DOLLY_CATEGORIES) + i for i, c in enumerate(unknown)})
    return categories


def read_dolly(path: str | os.PathLike[str]) -> list[Record]:
    """Dolly-15k JSONL (``instruction``, ``context``, ``response``, ``category``) → records."""
    file = _check_file(path, "Dolly")
    raws = list(_iter_records(file))
    categories = _dolly_categories(raws)
    return [_dolly_record(raw, where, categories) for where, raw in raws]


def read_humaneval(path: str | os.PathLike[str]) -> list[Record]:
    """HumanEval JSONL or JSONL.gz (``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test``)."""
    file = _check_file(path, "HumanEval")
    return [_humaneval_record(raw, where) for where, raw in _iter_records(file)]


def read_mbpp(path: str | os.PathLike[str]) -> list[Record]:
    """MBPP JSONL (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``) or the sanitized JSON."""
    file = _check_file(path, "MBPP")
    return [_mbpp_record(raw, where) for where, raw in _iter_records(file)]


# --------------------------------------------------------------------------- the dataset table


Splits = dict[str, list[Record]]
"""``{"train": ..., "test": ...}`` (given splits) or ``{"all": ...}`` (split by the seed)."""


@dataclass(frozen=True)
class RealDataset:
    """One real dataset: how to read it from a path or the Hub, and how to score it."""

    name: str
    description: str
    metric: Callable[[str | None], str]
    extra_features: Callable[[str | None], dict[str, Any]]
    load_path: Callable[[Path, str | None], Splits]
    hub_id: str | None
    load_hub: Callable[[str | None], Splits] | None
    check_option: Callable[[str | None], object]


REAL_DATASETS: dict[str, RealDataset] = {}
"""Real dataset name → ``RealDataset``; ``load_real_task`` reads specs naming these."""


def list_real_datasets() -> dict[str, str]:
    """Real dataset names → one-line descriptions."""
    return {name: d.description for name, d in sorted(REAL_DATASETS.items())}


def _data_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))


def _resolve(path: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """A file → ``{"all": file}``; a folder → its train/test files, or its only data file."""
    if not path.exists():
        raise FileNotFoundError(f"{what} path {str(path)!r} does not exist")
    if path.is_file():
        return {"all": path}
    files = _data_files(path, suffixes)
    if not files:
        raise ValueError(f"{what} folder {str(path)!r} has no data file ({', '.join(suffixes)})")
    kinds: dict[str, list[Path]] = {"train": [], "valid": [], "test": []}
    for file in files:
        stem = file.name.lower()
        for kind, keys in (("train", ("train",)), ("valid", ("valid", "dev", "val.")), ("test", ("test",))):
            if any(k in stem for k in keys):
                kinds[kind].append(file)
                break
    if any(len(v) > 1 for v in kinds.values()):
        raise ValueError(f"{what} folder {str(path)!r}: more than one file per split: {[f.name for f in files]}")
    train = kinds["train"] or kinds["valid"]
    if kinds["test"] and train:
        return {"train": train[0], "test": kinds["test"][0]}
    if len(files) == 1:
        return {"all": files[0]}
    raise ValueError(
        f"{what} folder {str(path)!r}: cannot tell the splits apart ({[f.name for f in files]}); "
        "name them *train* and *test*, or pass one file"
    )


def _read_split_files(
    path: Path, suffixes: tuple[str, ...], what: str, reader: Callable[[Path], list[Record]]
) -> Splits:
    return {split: reader(file) for split, file in _resolve(path, suffixes, what).items()}


def _hub_rows(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a Hub dataset split; any failure becomes a ValueError that says to pass a local path."""
    try:
        loaded = datasets.load_dataset(hub_id, config, split=split)
        return list(loaded.to_list())
    except Exception as err:  # offline, unknown id, gated, bad cache: all the same to the caller
        raise ValueError(
            f"could not load {hub_id!r} (config {config!r}, split {split!r}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {str(err)[:300]}. No hub here? Give a local copy as NAME:PATH "
            f"(see smartfed.data.real for the formats)"
        ) from err


def _hub_records(
    hub_id: str, config: str | None, split: str, normalise: Callable[[dict[str, Any], str], Record]
) -> list[Record]:
    return [normalise(row, f"{hub_id}[{split}] row {i}") for i, row in enumerate(_hub_rows(hub_id, config, split))]


def _register(dataset: RealDataset) -> None:
    if dataset.name in REAL_DATASETS:
        raise ValueError(f"real dataset {dataset.name!r} is already registered")
    REAL_DATASETS[dataset.name] = dataset


def _no_option(name: str) -> Callable[[str | None], None]:
    def check(option: str | None) -> None:
        if option is not None:
            raise ValueError(f"{name}: takes no option, got {name}.{option}")

    return check


def _one_option(name: str, allowed: str) -> Callable[[str | None], None]:
    def check(option: str | None) -> None:
        if option not in (None, allowed):
            raise ValueError(f"{name}: unknown option {option!r}; the only option is {name}.{allowed}")

    return check


_STR = Value("string")

# gsm8k
_register(
    RealDataset(
        name="gsm8k",
        description="GSM8K grade-school math, numeric final answer (.cot: answer with the worked rationale)",
        metric=lambda option: "final_number",
        extra_features=lambda option: {"rationale": _STR},
        load_path=lambda path, option: _read_split_files(
            path, (".jsonl",), "GSM8K", lambda f: read_gsm8k(f, cot=option == "cot")
        ),
        hub_id="openai/gsm8k",
        load_hub=lambda option: {
            split: _hub_records("openai/gsm8k", "main", split, lambda r, w: _gsm8k_record(r, w, cot=option == "cot"))
            for split in ("train", "test")
        },
        check_option=_one_option("gsm8k", "cot"),
    )
)

# gsm_hard
_register(
    RealDataset(
        name="gsm_hard",
        description="GSM-Hard (GSM8K test with large numbers), numeric answer (.program: PAL, run solution())",
        metric=lambda option: "program_numeric" if option == "program" else "final_number",
        extra_features=lambda option: {"target": Value("float64")},
        load_path=lambda path, option: _read_split_files(
            path, (".jsonl",), "GSM-Hard", lambda f: read_gsm_hard(f, program=option == "program")
        ),
        hub_id="reasoning-machines/gsm-hard",
        load_hub=lambda option: {
            "all": _hub_records(
                "reasoning-machines/gsm-hard",
                None,
                "train",
                lambda r, w: _gsm_hard_record(r, w, program=option == "program"),
            )
        },
        check_option=_one_option("gsm_hard", "program"),
    )
)


# mgsm
def _mgsm_languages(option: str | None) -> list[str] | None:
    if option is None:
        return None
    langs = [x.strip() for x in option.split(",") if x.strip()]
    unknown = [x for x in langs if x not in MGSM_LANGUAGES]
    if not langs or unknown:
        raise ValueError(f"mgsm: unknown language(s) {unknown or option!r}; MGSM has {list(MGSM_LANGUAGES)}")
    return langs


def _mgsm_group(records: list[Record]) -> list[Record]:
    """Tag each record with its problem (the row index), shared by the translations of the problem."""
    return [{**r, "_group": i} for i, r in enumerate(records)]


def _load_mgsm_path(path: Path, option: str | None) -> Splits:
    langs = _mgsm_languages(option)
    if not path.exists():
        raise FileNotFoundError(f"MGSM path {str(path)!r} does not exist")
    if path.is_file():
        lang = _mgsm_language(path, langs[0] if langs and len(langs) == 1 else None)
        if langs is not None and lang not in langs:
            raise ValueError(f"MGSM file {str(path)!r} is language {lang!r}, not one of {langs}")
        return {"all": _mgsm_group(read_mgsm(path, lang))}
    files = {m.group(1): p for p in _data_files(path, (".tsv",)) if (m := _MGSM_FILE.match(p.name))}
    if not files:
        raise ValueError(f"MGSM folder {str(path)!r} has no mgsm_xx.tsv file")
    wanted = langs if langs is not None else sorted(files)
    missing = [x for x in wanted if x not in files]
    if missing:
        raise ValueError(f"MGSM folder {str(path)!r} has no file for {missing} (it has {sorted(files)})")
    records: list[Record] = []
    for lang in wanted:
        records += _mgsm_group(read_mgsm(files[lang], lang))
    return {"all": records}


def _load_mgsm_hub(option: str | None) -> Splits:
    langs = _mgsm_languages(option) or list(MGSM_LANGUAGES)
    records: list[Record] = []
    for lang in langs:
        rows = _hub_rows("juletxara/mgsm", lang, "test")
        lang_records = [
            _mgsm_record(
                str(row.get("question") or ""), str(row.get("answer_number")), lang, f"juletxara/mgsm[{lang}] row {i}"
            )
            for i, row in enumerate(rows)
        ]
        records += _mgsm_group(lang_records)
    return {"all": records}


_register(
    RealDataset(
        name="mgsm",
        description="MGSM multilingual grade-school math (label: language; .es or .es,fr picks languages)",
        metric=lambda option: "final_number",
        extra_features=lambda option: {},
        load_path=_load_mgsm_path,
        hub_id="juletxara/mgsm",
        load_hub=_load_mgsm_hub,
        check_option=_mgsm_languages,
    )
)

# math23k
_register(
    RealDataset(
        name="math23k",
        description="Math23K Chinese math word problems (MWPToolkit JSON), numeric value answer",
        metric=lambda option: "math_value",
        extra_features=lambda option: {},
        load_path=lambda path, option: _read_split_files(path, (".json", ".jsonl"), "Math23K", read_math23k),
        hub_id=None,
        load_hub=None,
        check_option=_no_option("math23k"),
    )
)


# dolly
def _load_dolly_hub(option: str | None) -> Splits:
    rows = [
        (f"databricks/databricks-dolly-15k[train] row {i}", r)
        for i, r in enumerate(_hub_rows("databricks/databricks-dolly-15k", None, "train"))
    ]
    categories = _dolly_categories(rows)
    return {"all": [_dolly_record(r, w, categories) for w, r in rows]}


_register(
    RealDataset(
        name="dolly",
        description="Dolly-15k open instructions, ROUGE-L (label: category)",
        metric=lambda option: "rouge_l",
        extra_features=lambda option: {},
        load_path=lambda path, option: _read_split_files(path, (".jsonl", ".json"), "Dolly", read_dolly),
        hub_id="databricks/databricks-dolly-15k",
        load_hub=_load_dolly_hub,
        check_option=_no_option("dolly"),
    )
)

# humaneval
_register(
    RealDataset(
        name="humaneval",
        description="HumanEval Python functions, pass@1 of the completion in the sandbox",
        metric=lambda option: "humaneval_pass_at_1",
        extra_features=lambda option: {"test": _STR, "entry_point": _STR},
        load_path=lambda path, option: _read_split_files(
            path, (".jsonl", ".jsonl.gz", ".json"), "HumanEval", read_humaneval
        ),
        hub_id="openai/openai_humaneval",
        load_hub=lambda option: {"all": _hub_records("openai/openai_humaneval", None, "test", _humaneval_record)},
        check_option=_no_option("humaneval"),
    )
)


# mbpp
def _mbpp_official(splits: Splits) -> Splits:
    """One MBPP file holding both paper ranges → the paper's train and test; otherwise unchanged."""
    if set(splits) != {"all"}:
        return splits
    records = splits["all"]
    test = [r for r in records if r["task_id"] in MBPP_TEST_IDS]
    train = [r for r in records if r["task_id"] in MBPP_TRAIN_IDS]
    return {"train": train, "test": test} if test and train else splits


_register(
    RealDataset(
        name="mbpp",
        description="MBPP basic Python problems, pass@1 of the code against its asserts in the sandbox",
        metric=lambda option: "mbpp_pass_at_1",
        extra_features=lambda option: {
            "test_list": _List(_STR),
            "test_setup_code": _STR,
            "task_id": Value("int64"),
        },
        load_path=lambda path, option: _mbpp_official(_read_split_files(path, (".jsonl", ".json"), "MBPP", read_mbpp)),
        hub_id="google-research-datasets/mbpp",
        load_hub=lambda option: {
            split: _hub_records("google-research-datasets/mbpp", "full", split, _mbpp_record)
            for split in ("train", "test")
        },
        check_option=_no_option("mbpp"),
    )
)


# --------------------------------------------------------------------------- specs and loading


@dataclass(frozen=True)
class RealSpec:
    """A parsed ``NAME[.OPTION][:PATH]``; ``path`` None means the Hub."""

    name: str
    option: str | None
    path: str | None


_SPEC = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)(?:\.(?P<option>[A-Za-z0-9_,\-]+))?(?::(?P<path>.*))?$", re.DOTALL)


def parse_real_spec(spec: str | os.PathLike[str]) -> RealSpec | None:
    """``NAME[.OPTION][:PATH]`` → ``RealSpec``, or None when ``spec`` does not name a real dataset.

    None also for an existing path or a file name (``gsm8k.jsonl`` is an
    Alpaca-style file for ``load_task``, not the dataset ``gsm8k`` with option
    ``jsonl``), so that ``load_task`` goes on as before for those.

    Raises:
        ValueError: a real dataset's name with an unknown option or an empty path.
    """
    text = os.fspath(spec)
    if not isinstance(text, str):
        return None
    match = _SPEC.match(text)
    if match is None or match.group("name") not in REAL_DATASETS:
        return None
    path = match.group("path")
    if path is None and (os.path.exists(text) or text.endswith((".jsonl", ".json", ".gz", ".tsv"))):
        return None
    name, option = match.group("name"), match.group("option")
    if path is not None and not path.strip():
        raise ValueError(f"real task spec {text!r}: the path after ':' is empty")
    REAL_DATASETS[name].check_option(option)
    return RealSpec(name=name, option=option, path=path)


@dataclass(frozen=True)
class RealTask(Task):
    """A ``Task`` of a real dataset: its metric may be one of ``REAL_METRICS`` too.

    Attributes:
        source: the local path or the Hub id it was read from.
        extra_columns: the dataset's columns beyond ``prompt``, ``answer``, ``label``.
        split: how train and test were made: ``"given"`` (the dataset's own splits:
            split files, MBPP's task-id ranges, the Hub's splits) or ``"seeded"``.
    """

    source: str = ""
    extra_columns: tuple[str, ...] = ()
    split: str = "seeded"

    def __post_init__(self) -> None:
        allowed = (*get_args(MetricName), *REAL_METRICS)
        if self.metric not in allowed:
            raise ValueError(f"Task {self.name!r}: metric={self.metric!r} is not one of {list(allowed)}")
        # the base checks, with a metric the base class knows
        Task(
            name=self.name,
            prompt_template=self.prompt_template,
            answer_field=self.answer_field,
            metric="exact_match",
            label_field=self.label_field,
            description=self.description,
        )

    @property
    def record_metric(self) -> bool:
        """True when the metric needs whole records (``smartfed.eval.programs.RECORD_METRICS``)."""
        return self.metric in ("humaneval_pass_at_1", "mbpp_pass_at_1", "program_numeric")


def _dedup(records: Sequence[Record], exclude: set[str] | frozenset[str] = frozenset()) -> list[Record]:
    seen = set(exclude)
    unique = []
    for record in records:
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            unique.append(record)
    return unique


def _seeded_split(records: list[Record], seed: int, num_train: int, num_test: int, what: str) -> tuple[list, list]:
    """Split by groups (``_group``, else the prompt) so that a group is never on both sides."""
    groups: dict[Any, list[Record]] = {}
    for record in _dedup(records):
        groups.setdefault(record.get("_group", record["prompt"]), []).append(record)
    keys = list(groups)
    if len(keys) < 2:
        raise ValueError(f"{what}: {len(keys)} distinct problem(s); train and test need >= 2")
    random.Random(seed).shuffle(keys)
    test: list[Record] = []
    used = 0
    while len(test) < num_test and used < len(keys) - 1:
        test += groups[keys[used]]
        used += 1
    train = [r for k in keys[used:] for r in groups[k]]
    random.Random(seed + 1).shuffle(train)  # interleave the languages of a group
    test_prompts = {r["prompt"] for r in test}
    return _dedup(train, test_prompts)[:num_train], test[:num_test]


def _given_split(splits: Splits, seed: int, num_train: int, num_test: int, what: str) -> tuple[list, list]:
    test = _dedup(splits["test"])
    random.Random(seed).shuffle(test)
    test = test[:num_test]
    train = _dedup(splits["train"], {r["prompt"] for r in test})
    random.Random(seed + 1).shuffle(train)
    if not train:
        raise ValueError(f"{what}: the train split has no record whose prompt is not in test")
    return train[:num_train], test


def _to_dataset(records: list[Record], features: Features) -> Dataset:
    return Dataset.from_dict({c: [r[c] for r in records] for c in features}, features=features)


def load_real_task(
    spec: str | os.PathLike[str], *, seed: int, num_train: int = 512, num_test: int = 64
) -> tuple[RealTask, Dataset, Dataset]:
    """Load a real dataset named by ``NAME[.OPTION][:PATH]`` as ``(task, train, test)`` (module docstring).

    Both datasets have the columns ``prompt``, ``answer``, ``label`` and the
    dataset's extra columns (``task.extra_columns``).

    Raises:
        ValueError: not a real dataset spec (the message lists them), bad counts,
            a bad file (file and line or record named), a Hub failure (it says
            to pass a local path), too few records.
        FileNotFoundError: a path that does not exist.
    """
    parsed = parse_real_spec(spec)
    if parsed is None:
        raise ValueError(
            f"load_real_task: {os.fspath(spec)!r} is not a real dataset spec NAME[.OPTION][:PATH]; "
            f"datasets: {sorted(REAL_DATASETS)}"
        )
    seed = int(seed)
    num_train = _check_count("num_train", num_train, 1)
    num_test = _check_count("num_test", num_test, 0)
    dataset = REAL_DATASETS[parsed.name]
    label = f"{parsed.name}{'.' + parsed.option if parsed.option else ''}"
    if parsed.path is None:
        if dataset.load_hub is None or dataset.hub_id is None:
            raise ValueError(f"{label}: no Hub copy is known; give a local path as {label}:PATH")
        splits, source = dataset.load_hub(parsed.option), dataset.hub_id
    else:
        splits, source = dataset.load_path(Path(parsed.path).expanduser(), parsed.option), parsed.path
    if "all" in splits:
        train, test = _seeded_split(splits["all"], seed, num_train, num_test, f"{label} ({source})")
        how = "seeded"
    else:
        train, test = _given_split(splits, seed, num_train, num_test, f"{label} ({source})")
        how = "given"
    extra = dataset.extra_features(parsed.option)
    features = Features({**FEATURES, **extra})
    metric = dataset.metric(parsed.option)
    task = RealTask(
        name=os.fspath(spec),
        prompt_template="{prompt}",
        answer_field="answer",
        metric=metric,  # type: ignore[arg-type]  (RealTask accepts REAL_METRICS too)
        label_field="label",
        description=f"{dataset.description} [{source}; split: {how}; {metric}]",
        source=source,
        extra_columns=tuple(extra),
        split=how,
    )
    return task, _to_dataset(train, features), _to_dataset(test, features)
