"""What every reader of a real dataset uses: file reading, field checks, split files, the Hub, ``RealDataset``.

Errors name the file and the 1-based line (JSONL, TSV) or the 0-based record
index (JSON); a missing path raises ``FileNotFoundError``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Value

from ..common import iter_jsonl_objects

Record = dict[str, Any]
"""One normalised record: ``prompt``, ``answer``, ``label`` and the dataset's extra columns."""

Splits = dict[str, list[Record]]
"""``{"train": ..., "test": ...}`` (given splits) or ``{"all": ...}`` (split by the seed)."""

STR = Value("string")
"""The feature of a string column."""

STR_LIST: Any = (getattr(datasets, "List", None) or datasets.Sequence)(STR)
"""The feature of a list-of-strings column (``datasets.List`` where it exists, else ``Sequence``)."""


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


# --------------------------------------------------------------------------- files and fields


def check_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a ``Path``; FileNotFoundError when missing, ValueError when not a regular file."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{what} file {str(file)!r} does not exist")
    if not file.is_file():
        raise ValueError(f"{what} file {str(file)!r} is not a regular file")
    return file


def read_text(file: Path) -> bytes:
    """The bytes of ``file``, decompressed when its name ends in ``.gz``."""
    data = file.read_bytes()
    if file.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{file}: not a readable gzip file ({err})") from err
    return data


def iter_jsonl(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every non-blank line (``.gz`` read transparently); ``where`` is ``file:line``."""
    found = False
    for where, record in iter_jsonl_objects(read_text(file), file):
        found = True
        yield where, record
    if not found:
        raise ValueError(f"{file}: holds no records (it is empty or only blank lines)")


def iter_json_list(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every element of a JSON list; ``where`` names the 0-based record index.

    A file that is not one JSON document is read as JSON lines instead.
    """
    try:
        text = read_text(file).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):
            yield from iter_jsonl(file)
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


def iter_records(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``iter_json_list`` for ``.json`` (or ``.json.gz``) files, ``iter_jsonl`` for the others."""
    name = file.name[:-3] if file.name.endswith(".gz") else file.name
    return iter_json_list(file) if name.endswith(".json") else iter_jsonl(file)


def get_str(record: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    """The string field ``key`` of a record; ValueError naming ``where`` when missing, not a string, or empty."""
    if key not in record:
        raise ValueError(f"{where}: record has no {key!r} field (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {value!r}"[:300])
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def format_number(value: float) -> str:
    """``18.0`` → ``"18"``, ``0.4666…`` → ``"0.4666666667"`` (10 significant digits)."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"


def number_text(text: str, where: str, key: str) -> str:
    """A numeric answer without thousands separators; ValueError when it is not a number."""
    cleaned = text.strip().replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        raise ValueError(f"{where}: field {key!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: field {key!r} is not a finite number: {text!r}")
    return cleaned


# --------------------------------------------------------------------------- split files and the Hub


def data_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The regular files of ``folder`` whose names end in one of ``suffixes``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))


def _resolve(path: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """A file → ``{"all": file}``; a folder → its train/test files, or its only data file."""
    if not path.exists():
        raise FileNotFoundError(f"{what} path {str(path)!r} does not exist")
    if path.is_file():
        return {"all": path}
    files = data_files(path, suffixes)
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


def read_split_files(
    path: Path, suffixes: tuple[str, ...], what: str, reader: Callable[[Path], list[Record]]
) -> Splits:
    """A file → ``{"all": records}``; a folder → ``{"train", "test"}`` from its split files (or its only file)."""
    return {split: reader(file) for split, file in _resolve(path, suffixes, what).items()}


def hub_rows(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
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


def hub_records(
    hub_id: str, config: str | None, split: str, normalise: Callable[[dict[str, Any], str], Record]
) -> list[Record]:
    """``hub_rows`` normalised like the records of a file; ``where`` is ``hub_id[split] row i``."""
    return [normalise(row, f"{hub_id}[{split}] row {i}") for i, row in enumerate(hub_rows(hub_id, config, split))]


# --------------------------------------------------------------------------- options


def no_option(name: str) -> Callable[[str | None], None]:
    """The ``check_option`` of a dataset without variants."""

    def check(option: str | None) -> None:
        if option is not None:
            raise ValueError(f"{name}: takes no option, got {name}.{option}")

    return check


def one_option(name: str, allowed: str) -> Callable[[str | None], None]:
    """The ``check_option`` of a dataset with one variant, ``NAME.allowed``."""

    def check(option: str | None) -> None:
        if option not in (None, allowed):
            raise ValueError(f"{name}: unknown option {option!r}; the only option is {name}.{allowed}")

    return check
