"""MGSM: GSM8K problems translated into ten languages (and English).

Local format: one TSV file per language, ``mgsm_xx.tsv``, no header, question
TAB answer (csv ``QUOTE_NONE``); a folder holds several. Record: prompt =
question, answer = the number; label = the language's index in
``MGSM_LANGUAGES`` (so a Dirichlet partition skews clients by language). The
language comes from the file name or the ``lang`` argument. ``mgsm.es`` or
``mgsm.es,fr,de`` picks languages. Each record carries ``_group``, its
problem's row index, so that the seeded split keeps the translations of one
problem on the same side. Metric ``final_number``; Hub: juletxara/mgsm.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from .base import RealDataset, Record, Splits, check_file, data_files, hub_rows, number_text, read_text

MGSM_LANGUAGES: tuple[str, ...] = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
"""MGSM's languages; a record's label is its language's index here."""

_MGSM_FILE = re.compile(r"^mgsm_([a-z]{2})\.tsv$")


def _mgsm_record(question: str, answer: str, lang: str, where: str) -> Record:
    if not question.strip():
        raise ValueError(f"{where}: the question is empty")
    return {"prompt": question, "answer": number_text(answer, where, "answer"), "label": MGSM_LANGUAGES.index(lang)}


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
    file = check_file(path, "MGSM")
    lang = _mgsm_language(file, lang)
    try:
        text = read_text(file).decode("utf-8-sig")
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
    files = {m.group(1): p for p in data_files(path, (".tsv",)) if (m := _MGSM_FILE.match(p.name))}
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
        rows = hub_rows("juletxara/mgsm", lang, "test")
        lang_records = [
            _mgsm_record(
                str(row.get("question") or ""), str(row.get("answer_number")), lang, f"juletxara/mgsm[{lang}] row {i}"
            )
            for i, row in enumerate(rows)
        ]
        records += _mgsm_group(lang_records)
    return {"all": records}


MGSM = RealDataset(
    name="mgsm",
    description="MGSM multilingual grade-school math (label: language; .es or .es,fr picks languages)",
    metric=lambda option: "final_number",
    extra_features=lambda option: {},
    load_path=_load_mgsm_path,
    hub_id="juletxara/mgsm",
    load_hub=_load_mgsm_hub,
    check_option=_mgsm_languages,
)
