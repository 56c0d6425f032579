"""Real datasets: readers on the real files of shared/data, fixtures for Dolly and MBPP, specs, splits, metrics."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import datasets
import pytest
from datasets import Dataset

from smartfed.data import real as real_module
from smartfed.data.real import (
    DOLLY_CATEGORIES,
    MGSM_LANGUAGES,
    REAL_DATASETS,
    REAL_METRICS,
    RealTask,
    list_real_datasets,
    load_real_task,
    parse_real_spec,
    read_dolly,
    read_gsm8k,
    read_gsm_hard,
    read_humaneval,
    read_math23k,
    read_mbpp,
    read_mgsm,
)
from smartfed.eval import score
from smartfed.eval.programs import (
    ANSWER_METRICS,
    RECORD_METRICS,
    execute_solution,
    final_number,
    final_number_match,
    humaneval_program,
    known_metrics,
    math_value_match,
    parse_math_value,
    pass_at_1_humaneval,
    pass_at_1_mbpp,
    per_example_scores,
    program_numeric,
    score_records,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).parent / "fixtures" / "real"
MGSM_HERE = ("de", "en", "es", "fr", "zh")


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the real data files live in shared/data beside the clone)")
    return path


# --------------------------------------------------------------------------- readers on the real files


def test_gsm8k_counts_answers_and_rationale() -> None:
    test = read_gsm8k(shared("gsm8k", "test.jsonl"))
    train = read_gsm8k(shared("gsm8k", "train.jsonl"))
    assert (len(test), len(train)) == (1319, 7473)
    first = test[0]
    assert first["prompt"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first["answer"] == "18"
    assert first["label"] == 0
    assert "9 * 2" in first["rationale"] and "####" not in first["rationale"]
    lines = shared("gsm8k", "test.jsonl").read_text().splitlines()
    finals = [json.loads(line)["answer"].rsplit("####", 1)[1] for line in lines if line.strip()]
    assert [r["answer"] for r in test] == [f.strip().replace(",", "") for f in finals]  # the file's own, in order
    assert all(r["answer"].removeprefix("-").isdigit() for r in test)  # GSM8K's final answers are integers
    assert "2125" in {r["answer"] for r in test}  # "#### 2,125" in the file
    cot = read_gsm8k(shared("gsm8k", "test.jsonl"), cot=True)[0]
    assert cot["answer"].endswith("\n#### 18") and "<<" not in cot["answer"]
    assert final_number(cot["answer"]) == 18.0


def test_mgsm_per_language() -> None:
    for lang in MGSM_HERE:
        records = read_mgsm(shared("mgsm", f"mgsm_{lang}.tsv"))
        assert len(records) == 250, lang
        assert {r["label"] for r in records} == {MGSM_LANGUAGES.index(lang)}
        assert "2125" in {r["answer"] for r in records}  # "2,125" in the file
    es = read_mgsm(shared("mgsm", "mgsm_es.tsv"))
    assert es[0]["answer"] == "18" and es[0]["prompt"].startswith("Los patos de Janet")
    assert es[1]["answer"] == "3"
    # the lang argument wins over the file name
    assert read_mgsm(shared("mgsm", "mgsm_es.tsv"), lang="fr")[0]["label"] == MGSM_LANGUAGES.index("fr")


def test_gsm_hard_counts_and_targets() -> None:
    records = read_gsm_hard(shared("gsm_hard", "gsmhardv2.jsonl"))
    assert len(records) == 1319
    assert records[0]["target"] == -9867630.0 and records[0]["answer"] == "-9867630"
    assert all(isinstance(r["target"], float) for r in records)
    assert all(math.isclose(float(r["answer"]), r["target"], rel_tol=1e-9, abs_tol=1e-9) for r in records)
    pal = read_gsm_hard(shared("gsm_hard", "gsmhardv2.jsonl"), program=True)[0]
    assert pal["answer"].startswith("def solution():") and pal["prompt"].endswith("returns the answer.")


def test_gsm_hard_reference_programs_reproduce_target() -> None:
    for record in read_gsm_hard(shared("gsm_hard", "gsmhardv2.jsonl"), program=True)[:5]:
        value = execute_solution(record["answer"])
        assert value is not None and abs(value - record["target"]) < 1e-3, (value, record["target"])


def test_humaneval_reader_and_canonical_solutions_pass() -> None:
    records = read_humaneval(shared("humaneval", "HumanEval.jsonl.gz"))
    assert len(records) == 164
    assert records[0]["entry_point"] == "has_close_elements" and "def check(candidate)" in records[0]["test"]
    for record in records[:5]:
        assert pass_at_1_humaneval(record["answer"], record) == 1.0, record["entry_point"]
    wrong = "    return None\n"
    assert pass_at_1_humaneval(wrong, records[0]) == 0.0
    # a chat model's whole function, in a fence, counts as well
    whole = (
        f"Here it is:\n```python\n{records[0]['prompt'].split('def ')[0]}def has_close_elements(numbers, threshold):\n"
    )
    whole += "".join(f"{line}\n" for line in records[0]["answer"].splitlines()) + "```\n"
    assert pass_at_1_humaneval(whole, records[0]) == 1.0
    assert humaneval_program("    pass\n", records[0]).rstrip().endswith("check(has_close_elements)")
    # what a model writes after the body (column 0) is cut, as Codex's stop sequences do
    rambling = records[0]["answer"] + "\n\nassert False, 'not part of the answer'\n"
    assert pass_at_1_humaneval(rambling, records[0]) == 1.0


def test_math23k_counts_and_numeric_answers() -> None:
    test = read_math23k(shared("math23k", "mwptoolkit_testset.json"))
    valid = read_math23k(shared("math23k", "mwptoolkit_validset.json"))
    assert (len(test), len(valid)) == (2317, 2316)
    assert test[0]["answer"] == "9" and test[0]["prompt"].startswith("一段布剪去6米")
    assert all(parse_math_value(r["answer"]) is not None for r in [*test, *valid])
    raw = json.loads(shared("math23k", "mwptoolkit_testset.json").read_text(encoding="utf-8"))
    by_ans = {r["ans"]: rec["answer"] for r, rec in zip(raw, test, strict=True)}
    assert by_ans["((7)/(15))"] == "0.4666666667"
    assert by_ans["25%"] == "0.25"
    assert by_ans["19((3)/(4))"] == "19.75"


# --------------------------------------------------------------------------- fixtures: Dolly and MBPP


def test_dolly_fixture() -> None:
    records = read_dolly(FIXTURES / "dolly.jsonl")
    assert len(records) == 5
    assert records[0]["prompt"] == "When did the first person walk on the Moon?"
    assert records[1]["prompt"].startswith("How long is the Danube") and "\n\nThe Danube is" in records[1]["prompt"]
    assert records[1]["answer"] == "According to the passage, the Danube is 2,850 km long."
    assert [r["label"] for r in records] == [
        DOLLY_CATEGORIES.index(c) for c in ("open_qa", "closed_qa", "brainstorming", "summarization", "classification")
    ]
    task, train, test = load_real_task(f"dolly:{FIXTURES / 'dolly.jsonl'}", seed=0, num_train=10, num_test=2)
    assert task.metric == "rouge_l" and task.split == "seeded"
    assert (len(train), len(test)) == (3, 2)
    assert score(task.metric, list(test["answer"]), list(test["answer"])) == 1.0


def test_dolly_unknown_category_gets_a_new_label(tmp_path: Path) -> None:
    file = tmp_path / "d.jsonl"
    file.write_text(
        json.dumps({"instruction": "a", "context": "", "response": "b", "category": "zeta"})
        + "\n"
        + json.dumps({"instruction": "c", "context": "", "response": "d", "category": "open_qa"})
        + "\n",
        encoding="utf-8",
    )
    assert [r["label"] for r in read_dolly(file)] == [len(DOLLY_CATEGORIES), 0]


def test_mbpp_fixture_formats_and_pass_at_1() -> None:
    records = read_mbpp(FIXTURES / "mbpp.jsonl")
    assert [r["task_id"] for r in records] == [2, 11, 12, 601, 602]
    first = records[1]
    assert first["prompt"].startswith("Write a python function to remove first")
    assert 'assert remove_Occ("hello","l") == "heo"' in first["prompt"]
    for record in records:
        assert pass_at_1_mbpp(record["answer"], record) == 1.0, record["task_id"]
    assert pass_at_1_mbpp("def remove_Occ(s, ch):\n    return s\n", first) == 0.0
    assert records[3]["test_setup_code"] == "import math"
    sanitized = read_mbpp(FIXTURES / "mbpp_sanitized.json")
    assert [r["task_id"] for r in sanitized] == [11, 601]
    assert sanitized[1]["test_setup_code"] == "import math"
    assert pass_at_1_mbpp(sanitized[1]["answer"], sanitized[1]) == 1.0  # math comes from test_imports


def test_mbpp_uses_the_paper_split_by_task_id() -> None:
    task, train, test = load_real_task(f"mbpp:{FIXTURES / 'mbpp.jsonl'}", seed=1, num_train=10, num_test=10)
    assert task.metric == "mbpp_pass_at_1" and task.split == "given"
    assert sorted(test["task_id"]) == [11, 12] and sorted(train["task_id"]) == [601, 602]
    assert train.column_names == ["prompt", "answer", "label", "test_list", "test_setup_code", "task_id"]
    assert score_records(task.metric, list(test["answer"]), test) == 1.0


# --------------------------------------------------------------------------- specs and load_real_task


def test_parse_real_spec() -> None:
    assert parse_real_spec("gsm8k") == real_module.RealSpec("gsm8k", None, None)
    assert parse_real_spec("mgsm.es,fr:/a/b:c") == real_module.RealSpec("mgsm", "es,fr", "/a/b:c")
    assert parse_real_spec("gsm_hard.program:x.jsonl") == real_module.RealSpec("gsm_hard", "program", "x.jsonl")
    for not_real in ("arith", "copy", "gsm8k.jsonl", "data/gsm8k.jsonl", "unknown:path", "Gsm8k"):
        assert parse_real_spec(not_real) is None, not_real
    with pytest.raises(ValueError, match=r"unknown option 'xyz'"):
        parse_real_spec("gsm8k.xyz:/tmp")
    with pytest.raises(ValueError, match=r"unknown language"):
        parse_real_spec("mgsm.xx:/tmp")
    with pytest.raises(ValueError, match=r"takes no option"):
        parse_real_spec("humaneval.foo")
    with pytest.raises(ValueError, match=r"path after ':' is empty"):
        parse_real_spec("gsm8k:")
    datasets_ = {"gsm8k", "gsm_hard", "mgsm", "math23k", "dolly", "humaneval", "mbpp"}
    assert set(list_real_datasets()) == datasets_ | {"cn_math", "cn_code", "math_code"}  # and the paper's tasks


def test_every_real_metric_is_registered() -> None:
    for metric in REAL_METRICS:
        assert metric in known_metrics() and (metric in ANSWER_METRICS) != (metric in RECORD_METRICS), metric
    options = {"gsm8k": "cot", "gsm_hard": "program", "mgsm": "es"}
    for name, dataset in REAL_DATASETS.items():
        for option in (None, options.get(name)):
            assert dataset.metric(option) in {*REAL_METRICS, "rouge_l"}, (name, option)


def test_load_gsm8k_folder_uses_its_split_files() -> None:
    folder = shared("gsm8k")
    task, train, test = load_real_task(f"gsm8k:{folder}", seed=0, num_train=300, num_test=50)
    assert isinstance(task, RealTask) and task.metric == "final_number" and task.split == "given"
    assert task.extra_columns == ("rationale",)
    assert (len(train), len(test)) == (300, 50)
    assert train.column_names == ["prompt", "answer", "label", "rationale"]
    test_file = {r["prompt"] for r in read_gsm8k(folder / "test.jsonl")}
    assert set(test["prompt"]) <= test_file and not set(train["prompt"]) & test_file
    again = load_real_task(f"gsm8k:{folder}", seed=0, num_train=300, num_test=50)
    assert again[1]["prompt"] == train["prompt"] and again[2]["prompt"] == test["prompt"]
    other = load_real_task(f"gsm8k:{folder}", seed=1, num_train=300, num_test=50)
    assert other[2]["prompt"] != test["prompt"]
    assert score_records(task.metric, [f"so... #### {a}" for a in test["answer"]], test) == 1.0
    assert score_records(task.metric, ["0"] * len(test), test) == 0.0


def test_load_mgsm_splits_by_problem_across_languages() -> None:
    folder = shared("mgsm")
    task, train, test = load_real_task(f"mgsm:{folder}", seed=3, num_train=10_000, num_test=100)
    assert task.metric == "final_number"
    assert len(test) == 100 and len(train) == 250 * len(MGSM_HERE) - 100
    row_of = {r["prompt"]: i for lang in MGSM_HERE for i, r in enumerate(read_mgsm(folder / f"mgsm_{lang}.tsv"))}
    test_rows, train_rows = {row_of[p] for p in test["prompt"]}, {row_of[p] for p in train["prompt"]}
    assert not test_rows & train_rows
    assert set(train["label"]) == {MGSM_LANGUAGES.index(x) for x in MGSM_HERE}
    _, es_train, es_test = load_real_task(f"mgsm.es,de:{folder}", seed=3, num_train=10_000, num_test=20)
    assert set(es_test["label"]) | set(es_train["label"]) == {MGSM_LANGUAGES.index("es"), MGSM_LANGUAGES.index("de")}
    _, _, one = load_real_task(f"mgsm:{folder / 'mgsm_fr.tsv'}", seed=0, num_train=5, num_test=5)
    assert set(one["label"]) == {MGSM_LANGUAGES.index("fr")}


def test_load_math23k_humaneval_and_gsm_hard() -> None:
    task, train, test = load_real_task(f"math23k:{shared('math23k')}", seed=0, num_train=20, num_test=10)
    assert task.metric == "math_value" and task.split == "given"  # validset as train, testset as test
    task, train, test = load_real_task(f"humaneval:{shared('humaneval')}", seed=0, num_train=20, num_test=3)
    assert task.metric == "humaneval_pass_at_1" and (len(train), len(test)) == (20, 3)
    assert score_records(task.metric, list(test["answer"]), test, workers=2) == 1.0
    task, _, test = load_real_task(
        f"gsm_hard.program:{shared('gsm_hard', 'gsmhardv2.jsonl')}", seed=0, num_train=5, num_test=2
    )
    assert task.metric == "program_numeric"
    assert per_example_scores(task.metric, list(test["answer"]), test) == [1.0, 1.0]
    assert program_numeric("def solution():\n    return 1.5\n", {"target": 2.0}) == 0.0


def test_num_test_zero_gives_an_empty_test_set_with_the_columns() -> None:
    _, train, test = load_real_task(f"dolly:{FIXTURES / 'dolly.jsonl'}", seed=0, num_train=10, num_test=0)
    assert len(test) == 0 and test.column_names == train.column_names and len(train) == 5
    # MBPP's paper split: the sanitized fixture holds one test id (11) and one train id (601)
    _, train, test = load_real_task(f"mbpp:{FIXTURES / 'mbpp_sanitized.json'}", seed=0, num_train=5, num_test=0)
    assert len(test) == 0 and train["task_id"] == [601]


# --------------------------------------------------------------------------- the Hub path (faked: no hub here)


def test_hub_failure_says_to_pass_a_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"openai/gsm8k.*ConnectionError.*local copy as NAME:PATH"):
        load_real_task("gsm8k", seed=0, num_train=2, num_test=1)
    with pytest.raises(ValueError, match=r"no Hub copy is known; give a local path as math23k:PATH"):
        load_real_task("math23k", seed=0, num_train=2, num_test=1)


def test_hub_rows_are_normalised_like_files(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(hub_id: str, config: str | None = None, *, split: str) -> Dataset:
        calls.append((hub_id, config, split))
        if hub_id == "juletxara/mgsm":
            rows = [
                {"question": f"Q{i} {config}", "answer": None, "answer_number": i, "equation_solution": None}
                for i in range(4)
            ]
        else:
            rows = [{"question": f"{split} q{i}", "answer": f"so {i}\n#### {i}"} for i in range(3)]
        return Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task, train, test = load_real_task("gsm8k", seed=0, num_train=5, num_test=2)
    assert task.source == "openai/gsm8k" and task.split == "given"
    assert set(test["prompt"]) <= {"test q0", "test q1", "test q2"} and len(train) == 3
    _, train, test = load_real_task("mgsm.es,en", seed=0, num_train=10, num_test=2)
    assert ("juletxara/mgsm", "es", "test") in calls and ("juletxara/mgsm", "en", "test") in calls
    assert len(test) == 2 and len(train) == 6 and sorted(set(train["answer"]) | set(test["answer"])) == list("0123")


# --------------------------------------------------------------------------- bad files


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_files_name_the_file_and_the_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"GSM8K file .*missing\.jsonl.* does not exist"):
        read_gsm8k(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_real_task(f"gsm8k:{tmp_path / 'nope'}", seed=0, num_train=1, num_test=1)
    good = json.dumps({"question": "q", "answer": "r\n#### 3"})
    bad_json = _write(tmp_path / "a.jsonl", [good, "{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: invalid JSON"):
        read_gsm8k(bad_json)
    no_field = _write(tmp_path / "b.jsonl", [good, "", json.dumps({"question": "q2"})])
    with pytest.raises(ValueError, match=r"b\.jsonl:3: record has no 'answer' field"):
        read_gsm8k(no_field)
    no_marker = _write(tmp_path / "c.jsonl", [json.dumps({"question": "q", "answer": "just 3"})])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: field 'answer' has no '#### N'"):
        read_gsm8k(no_marker)
    with pytest.raises(ValueError, match=r"holds no records"):
        read_gsm8k(_write(tmp_path / "empty.jsonl", [""]))
    not_object = _write(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object"):
        read_humaneval(not_object)
    fake_gz = tmp_path / "e.jsonl.gz"
    fake_gz.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"e\.jsonl\.gz: not a readable gzip file"):
        read_humaneval(fake_gz)
    gz = tmp_path / "f.jsonl.gz"
    gz.write_bytes(gzip.compress(json.dumps({"task_id": "x", "prompt": "p"}).encode() + b"\n"))
    with pytest.raises(ValueError, match=r"f\.jsonl\.gz:1: record has no 'entry_point' field"):
        read_humaneval(gz)
    hard = _write(tmp_path / "g.jsonl", [json.dumps({"input": "q", "code": "def solution(): pass", "target": "x"})])
    with pytest.raises(ValueError, match=r"g\.jsonl:1: field 'target' must be a finite number"):
        read_gsm_hard(hard)
    mbpp = _write(tmp_path / "h.jsonl", [json.dumps({"task_id": 1, "text": "t", "code": "c", "test_list": []})])
    with pytest.raises(ValueError, match=r"h\.jsonl:1: field 'test_list' must be a non-empty list"):
        read_mbpp(mbpp)
    dolly = _write(tmp_path / "i.jsonl", [json.dumps({"instruction": "i", "context": "", "category": "open_qa"})])
    with pytest.raises(ValueError, match=r"i\.jsonl:1: record has no 'response' field"):
        read_dolly(dolly)


def test_bad_tsv_and_json_list(tmp_path: Path) -> None:
    tsv = tmp_path / "mgsm_es.tsv"
    tsv.write_text("Pregunta uno\t18\nPregunta dos\t3\textra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mgsm_es\.tsv:2: expected 2 tab-separated columns"):
        read_mgsm(tsv)
    tsv.write_text("Pregunta uno\tdieciocho\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mgsm_es\.tsv:1: field 'answer' is not a number"):
        read_mgsm(tsv)
    unnamed = tmp_path / "questions.tsv"
    unnamed.write_text("Q\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot tell the language"):
        read_mgsm(unnamed)
    assert read_mgsm(unnamed, lang="de")[0]["label"] == MGSM_LANGUAGES.index("de")
    listed = tmp_path / "testset.json"
    listed.write_text(json.dumps([{"original_text": "a", "ans": "1"}, {"original_text": "b"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"testset\.json: record index 1: record has no 'ans' field"):
        read_math23k(listed)
    listed.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match=r"testset\.json: invalid JSON"):
        read_math23k(listed)
    folder = tmp_path / "many"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        _write(folder / name, [json.dumps({"question": "q", "answer": "#### 1"})])
    with pytest.raises(ValueError, match=r"cannot tell the splits apart"):
        load_real_task(f"gsm8k:{folder}", seed=0, num_train=1, num_test=1)
    with pytest.raises(ValueError, match=r"not a real dataset spec"):
        load_real_task("arith", seed=0)


# --------------------------------------------------------------------------- answer metrics


def test_final_number_and_math_value() -> None:
    assert final_number("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18") == 18.0
    assert final_number("The answer is 1,234 dollars, not 3.") == 1234.0
    assert final_number("La respuesta es 18.") == 18.0
    assert final_number("3 + 4 = 7") == 7.0 and final_number("none") is None
    assert final_number_match("so the total is 70,000", "70000") == 1.0
    assert final_number_match("12 then 13", "12") == 0.0
    assert parse_math_value("((7)/(15))") == pytest.approx(7 / 15)
    assert parse_math_value("19((3)/(4))") == 19.75 and parse_math_value("112.5%") == 1.125
    assert parse_math_value("__import__('os')") is None and parse_math_value("2**8") is None
    assert math_value_match("答案是 7/15", "0.4666666667") == 1.0
    assert math_value_match("占 25%", "0.25") == 1.0
    assert math_value_match("x=3*490-865=605", "605") == 1.0
    assert math_value_match("0.47", "0.4666666667") == 0.0
    with pytest.raises(ValueError, match=r"unknown metric 'nope'"):
        score_records("nope", ["a"], [{"answer": "a"}])


def test_load_task_dispatches_real_specs_and_scores_with_record_metrics() -> None:
    """The task loader every run uses accepts the spec; evaluate_task scores pass@1 through the sandbox."""
    from smartfed.data import load_task
    from smartfed.eval.programs import score_records

    path = shared("humaneval", "HumanEval.jsonl.gz")
    task, _train, test = load_task(f"humaneval:{path}", seed=0, num_train=8, num_test=4)
    assert task.metric == "humaneval_pass_at_1" and len(test) == 4
    rows = test.to_list()
    assert score_records(task.metric, [r["answer"] for r in rows], rows) == 1.0
    assert score_records(task.metric, ["    return None\n"] * 4, rows) == 0.0
