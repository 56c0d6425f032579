"""The paper's tasks cn_math, cn_code, math_code: loading from a data folder, splits, errors, scores, configs, runs.

Fixtures are written into tmp_path in the real formats (MWPToolkit JSON, MGSM TSV,
GSM-Hard JSONL, MathCodeInstruct ``messages``, the documented DoIT JSONL); one test
reads the real files of shared/data and skips where they are absent.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from smartfed.data import load_task
from smartfed.data.readers import REAL_DATASETS, read_doit, read_mathcodeinstruct
from smartfed.data.readers.doit import TESTS_HEADER
from smartfed.data.readers.gsm import PROGRAM_INSTRUCTION
from smartfed.eval.programs import per_example_scores
from smartfed.run.config import RunConfig

from .conftest import run_in_process, tiny_run_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"
TASKS = ("cn_math", "cn_code", "math_code")

# --------------------------------------------------------------------------- fixtures in the real formats

MATH23K = [  # MWPToolkit's fields; answers as the file writes them (a fraction, a percentage)
    {"id": str(i), "original_text": text, "segmented_text": text, "equation": eq, "ans": ans}
    for i, (text, eq, ans) in enumerate(
        [
            ("小明有5个苹果，又买了3个，一共有多少个？", "x=5+3", "8"),
            ("一本书120页，已经看了(1/4)，看了多少页？", "x=120*(1/4)", "30"),
            ("甲数是12，乙数是甲数的(7/15)，乙数是多少？", "x=12*(7/15)", "5.6"),
            ("一件衣服打八折后是80元，原价多少元？", "x=80/0.8", "100"),
            ("班里有40人，女生16人，女生占百分之几？", "x=16/40", "40%"),
            ("一根绳子长9米，剪去一半，还剩多少米？", "x=9/2", "((9)/(2))"),
        ]
    )
]
MGSM_ZH = [  # question TAB answer, no header
    ("珍妮特的鸭子每天下 16 颗蛋。她吃掉 3 颗，用 4 颗做松饼，剩下的每颗卖 2 美元。她每天赚多少钱？", "18"),
    ("制作一件袍子需要 2 匹蓝色布料和一半数量的白色布料。一共需要多少匹？", "3"),
    ("约翰每周跑 3 次，每次跑 3 段，每段 60 米。他每周跑多少米？", "540"),
    ("一个农场有 20 只鸡，每只每天吃 3 杯饲料。一天一共需要多少杯？", "60"),
    ("一盒有 12 支笔，买了 7 盒。一共有多少支笔？", "84"),
]
GSM_HARD = [  # PAL's fields: a solution() program and its float target
    {"input": f"A box holds {n} pens. How many pens are in 3 boxes?", "code": f"def solution():\n    return 3 * {n}\n"}
    for n in (1234567, 7654321, 5555555, 2468013)
]
for _item in GSM_HARD:
    _item["target"] = float(3 * int(_item["input"].split()[3]))
DOIT_TESTED = [  # instruction, reference solution, asserts
    ("写一个函数 add(a, b)，返回两个数的和。", "def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3"]),
    ("写一个函数 square(x)，返回 x 的平方。", "def square(x):\n    return x * x\n", ["assert square(4) == 16"]),
    ("写一个函数 rev(s)，返回反转后的字符串。", "def rev(s):\n    return s[::-1]\n", ["assert rev('ab') == 'ba'"]),
    ("写一个函数 is_even(n)，判断 n 是否为偶数。", "def is_even(n):\n    return n % 2 == 0\n", ["assert is_even(4)"]),
    (
        "写一个函数 maximum(xs)，返回列表最大值。",
        "def maximum(xs):\n    return max(xs)\n",
        ["assert maximum([1, 5]) == 5"],
    ),
]
DOIT_UNTESTED = [
    ("解释 Python 中列表和元组的区别。", "列表可变，元组不可变。"),
    ("用 Python 打印 hello。", "```python\nprint('hello')\n```"),
]


def _mathcode_line(question: str, code: str, result: str) -> dict:
    """One MathCodeInstruct conversation: system, user, assistant with text / code / execution blocks."""
    blocks = [
        {"type": "text", "content": "Let's compute it."},
        {"type": "code", "content": code},
        {"type": "execution", "content": result},
        {"type": "text", "content": f"The answer is {result}."},
    ]
    return {
        "messages": [
            {"role": "system", "content": [{"type": "text", "content": "Below is a math problem."}]},
            {"role": "user", "content": [{"type": "text", "content": question}]},
            {"role": "assistant", "content": blocks},
        ]
    }


MATHCODE = [
    _mathcode_line(f"What is {a} + {b}?", f"{a} + {b}", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
]
MATHCODE.append({"instruction": "What is 2 * 21?", "output": "```python\n2 * 21\n```\n42"})  # a hand-converted line


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _doit_rows() -> list[dict]:
    tested = [{"instruction": i, "output": o, "test_list": t} for i, o, t in DOIT_TESTED]
    return tested + [{"instruction": i, "output": o} for i, o in DOIT_UNTESTED]


def write_data(root: Path) -> Path:
    """A data folder laid out as shared/data, with small files in the real formats of every paper task."""
    (root / "math23k").mkdir(parents=True)
    (root / "math23k" / "mwptoolkit_validset.json").write_text(json.dumps(MATH23K, ensure_ascii=False, indent=4))
    (root / "mgsm").mkdir()
    (root / "mgsm" / "mgsm_zh.tsv").write_text("".join(f"{q}\t{a}\n" for q, a in MGSM_ZH), encoding="utf-8")
    _jsonl(root / "gsm_hard" / "gsmhardv2.jsonl", GSM_HARD)
    _jsonl(root / "mathcodeinstruct" / "train_80k.jsonl", MATHCODE)
    _jsonl(root / "doit" / "doit.jsonl", _doit_rows())
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_data(tmp_path / "data")


def _load(spec: str, seed: int = 0, num_train: int = 64, num_test: int = 2):
    return load_task(spec, seed=seed, num_train=num_train, num_test=num_test)


# --------------------------------------------------------------------------- loading and splits


def test_the_tasks_are_registered_real_datasets_without_a_hub_copy() -> None:
    assert set(TASKS) <= set(REAL_DATASETS)
    for name in TASKS:
        with pytest.raises(ValueError, match=rf"{name}: no Hub copy is known; give a local path as {name}:PATH"):
            _load(name)
        with pytest.raises(ValueError, match=rf"{name}: takes no option"):
            _load(f"{name}.zh:/data")


def test_cn_math_trains_on_every_math23k_file_and_tests_on_mgsm_zh(data: Path) -> None:
    (data / "math23k" / "mwptoolkit_testset.json").write_text(json.dumps(MATH23K[:1], ensure_ascii=False))
    task, train, test = _load(f"cn_math:{data}", num_test=3)
    assert task.metric == "final_number" and task.split == "given"
    assert {r["prompt"] for r in train} == {r["original_text"] for r in MATH23K}  # both files, deduplicated
    assert len(train) == len(MATH23K)
    assert {r["prompt"]: r["answer"] for r in train}[MATH23K[4]["original_text"]] == "0.4"  # "40%" as a value
    assert len(test) == 3 and {(r["prompt"], r["answer"]) for r in test} <= set(MGSM_ZH)


def test_math_code_trains_on_mathcodeinstruct_and_tests_gsm_hard_programs(data: Path) -> None:
    task, train, test = _load(f"math_code:{data}", num_test=4)
    assert task.metric == "program_numeric" and task.record_metric
    assert sorted(test["prompt"]) == sorted(g["input"] + PROGRAM_INSTRUCTION for g in GSM_HARD)
    assert set(test["target"]) == {g["target"] for g in GSM_HARD}
    rows = {r["prompt"]: r for r in train}
    assert set(rows) == {"What is 1 + 2?", "What is 3 + 4?", "What is 5 + 6?", "What is 7 + 8?", "What is 2 * 21?"}
    assert rows["What is 1 + 2?"]["answer"] == (
        "Let's compute it.\n\n```python\n1 + 2\n```\n\n```output\n3\n```\n\nThe answer is 3."
    )
    assert "Below is a math problem" not in rows["What is 1 + 2?"]["prompt"]  # the system message is dropped
    assert all(r["target"] is None for r in train)


def test_cn_code_one_file_tests_only_tested_problems_and_never_trains_on_them(data: Path) -> None:
    task, train, test = _load(f"cn_code:{data}", num_test=2)
    assert task.metric == "mbpp_pass_at_1" and task.record_metric
    assert len(test) == 2 and all(r["test_list"] for r in test)
    assert all(TESTS_HEADER in r["prompt"] and r["test_list"][0] in r["prompt"] for r in test)
    assert not set(train["prompt"]) & set(test["prompt"])
    # the three tested problems not drawn for test and both untested ones are trained on
    assert len(train) == len(DOIT_TESTED) - 2 + len(DOIT_UNTESTED)
    assert {r["prompt"] for r in train if not r["test_list"]} == {i for i, _ in DOIT_UNTESTED}


def test_cn_code_train_and_test_files(data: Path) -> None:
    (data / "doit" / "doit.jsonl").unlink()
    rows = _doit_rows()
    _jsonl(data / "doit" / "train.jsonl", rows[3:])
    _jsonl(data / "doit" / "test.jsonl", rows[:3])
    _, train, test = _load(f"cn_code:{data}", num_test=10)
    assert sorted(test["prompt"]) == sorted(r["prompt"] for r in read_doit(data / "doit" / "test.jsonl"))
    assert len(train) == 4 and not set(train["prompt"]) & set(test["prompt"])


@pytest.mark.parametrize("name", TASKS)
def test_held_out_items_are_disjoint_from_training_and_the_split_is_seeded(data: Path, name: str) -> None:
    first = _load(f"{name}:{data}", seed=5, num_test=2)
    again = _load(f"{name}:{data}", seed=5, num_test=2)
    assert first[1].to_list() == again[1].to_list() and first[2].to_list() == again[2].to_list()
    tests = {seed: _load(f"{name}:{data}", seed=seed, num_test=2)[2]["prompt"] for seed in range(8)}
    assert len({tuple(t) for t in tests.values()}) > 1  # the seed picks the held-out items
    for seed in range(8):
        _, train, test = _load(f"{name}:{data}", seed=seed, num_test=2)
        assert not set(train["prompt"]) & set(test["prompt"])


# --------------------------------------------------------------------------- errors name the file


def test_missing_folders_and_files_are_named(data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cn_math: data folder '.*nowhere' does not exist"):
        _load(f"cn_math:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"is a file; give the data folder that holds math23k/"):
        _load(f"cn_math:{data / 'mgsm' / 'mgsm_zh.tsv'}")
    shutil.rmtree(data / "mathcodeinstruct")
    with pytest.raises(FileNotFoundError, match=r"'.*/mathcodeinstruct' does not exist; the data folder must hold"):
        _load(f"math_code:{data}")
    (data / "mgsm" / "mgsm_zh.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"MGSM file '.*mgsm_zh\.tsv' does not exist"):
        _load(f"cn_math:{data}")


def test_malformed_files_are_named_with_the_line_or_record(data: Path) -> None:
    bad = [dict(MATH23K[0]), {k: v for k, v in MATH23K[1].items() if k != "ans"}]
    (data / "math23k" / "mwptoolkit_validset.json").write_text(json.dumps(bad, ensure_ascii=False))
    with pytest.raises(ValueError, match=r"mwptoolkit_validset\.json: record index 1: record has no 'ans' field"):
        _load(f"cn_math:{data}")

    line = _mathcode_line("What is 1 + 1?", "1 + 1", "2")
    line["messages"][2]["content"][1]["type"] = "picture"
    _jsonl(data / "mathcodeinstruct" / "train_80k.jsonl", [MATHCODE[0], line])
    with pytest.raises(ValueError, match=r"train_80k\.jsonl:2 messages\[2\] block 1: unknown block type 'picture'"):
        _load(f"math_code:{data}")
    _jsonl(data / "mathcodeinstruct" / "train_80k.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"train_80k\.jsonl:1: no non-empty 'assistant' message"):
        read_mathcodeinstruct(data / "mathcodeinstruct" / "train_80k.jsonl")
    _jsonl(data / "mathcodeinstruct" / "train_80k.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"train_80k\.jsonl:1: record has neither 'messages'"):
        read_mathcodeinstruct(data / "mathcodeinstruct" / "train_80k.jsonl")

    _jsonl(data / "doit" / "doit.jsonl", [{"instruction": "x", "output": "y", "test_list": "assert True"}])
    with pytest.raises(ValueError, match=r"doit\.jsonl:1: field 'test_list' must be a list of non-empty strings"):
        _load(f"cn_code:{data}")
    _jsonl(data / "doit" / "doit.jsonl", [{"instruction": i, "output": o} for i, o in DOIT_UNTESTED])
    with pytest.raises(ValueError, match=r"DoIT folder .*: no problem has a 'test_list'"):
        _load(f"cn_code:{data}")
    (data / "doit" / "doit.jsonl").unlink()
    _jsonl(data / "doit" / "train.jsonl", _doit_rows())
    _jsonl(data / "doit" / "test.jsonl", [_doit_rows()[0], {"instruction": "z", "output": "w"}])
    with pytest.raises(ValueError, match=r"test\.jsonl:2: a DoIT test problem needs a non-empty 'test_list'"):
        _load(f"cn_code:{data}")


# --------------------------------------------------------------------------- scoring: a right and a wrong answer


def test_each_task_scores_a_right_and_a_wrong_answer(data: Path) -> None:
    task, _, test = _load(f"cn_math:{data}", num_test=1)
    row = test.to_list()[0]
    assert per_example_scores(task.metric, [f"答案是 {row['answer']}", "答案是 -1"], [row, row]) == [1.0, 0.0]

    task, _, test = _load(f"cn_code:{data}", num_test=1)
    row = test.to_list()[0]
    wrong = row["answer"].replace("return", "return None #")
    assert per_example_scores(task.metric, [f"```python\n{row['answer']}```", wrong], [row, row]) == [1.0, 0.0]

    task, _, test = _load(f"math_code:{data}", num_test=1)
    row = test.to_list()[0]
    assert per_example_scores(task.metric, [row["answer"], "def solution():\n    return 1\n"], [row, row]) == [1.0, 0.0]


# --------------------------------------------------------------------------- configs/paper


@pytest.mark.parametrize("name", TASKS)
def test_paper_config_parses_into_the_protocol(name: str, data: Path, tmp_path: Path) -> None:
    path = CONFIGS / f"{name}.toml"
    values = RunConfig.from_file(path)
    assert values["task"] == f"{name}:/path/to/data"  # the placeholder the README tells to replace
    pool = values["lora_pool"].split(",")
    assert len(pool) == 2 and all(p.startswith("/path/to/") for p in pool)
    values.update(task=values["task"].replace("/path/to/data", str(data)), lora_pool="/a,/b")
    config = RunConfig.from_dict(values, source=str(path))
    protocol = dict(num_clients=20, sample_clients=2, num_rounds=20, local_steps=10, batch_size=16)
    protocol.update(learning_rate=5e-4, topk_experts=32, enable_eeqa=True, method="smartfed")
    protocol.update(lora_rank=32, lora_alpha=64.0, lora_target_modules="q_proj,v_proj")
    assert {k: getattr(config, k) for k in protocol} == protocol
    assert config.model_name_or_path == "meta-llama/Llama-2-7b-hf"
    load_task(config.task, seed=config.seed, num_train=config.num_train, num_test=2)  # the spec loads
    text = path.read_text(encoding="utf-8")
    kinds = {"cn_math": ("Chinese chat", "English math"), "cn_code": ("Chinese chat", "English code")}
    for kind in kinds.get(name, ("English math", "English code")):
        assert f"{kind} LoRA" in text  # the comment says which public LoRA goes there
    assert "rank 32, alpha 64, on q_proj and v_proj" in text


def test_paper_configs_and_readme_cover_the_three_tasks() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.toml")) == sorted(TASKS)
    readme = (CONFIGS / "README.md").read_text(encoding="utf-8")
    for needle in ("--device cuda --dtype bfloat16", "--load_in_4bit", "PLACEHOLDER", *TASKS):
        assert needle in readme


# --------------------------------------------------------------------------- the real files of shared/data


def test_cn_math_and_math_code_on_the_shared_data(tmp_path: Path) -> None:
    for part in ("math23k", "mgsm/mgsm_zh.tsv", "gsm_hard/gsmhardv2.jsonl"):
        if not (SHARED / part).exists():
            pytest.skip(f"{SHARED / part} is absent (the real data files live in shared/data beside the clone)")
    task, train, test = _load(f"cn_math:{SHARED}", num_train=10_000, num_test=250)
    assert len(test) == 250 and len(train) > 4000  # all of MGSM zh; Math23K's valid + test files
    assert all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in test)
    assert not set(train["prompt"]) & set(test["prompt"])
    # math_code: the real GSM-Hard beside a MathCodeInstruct fixture; the reference programs score 1
    (tmp_path / "gsm_hard").symlink_to(SHARED / "gsm_hard")
    _jsonl(tmp_path / "mathcodeinstruct" / "train_80k.jsonl", MATHCODE)
    task, train, test = _load(f"math_code:{tmp_path}", num_test=3)
    rows = test.to_list()
    assert per_example_scores(task.metric, [r["answer"] for r in rows], rows) == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- end to end on the tiny model


@pytest.mark.parametrize("name", TASKS)
def test_a_short_federation_runs_each_task(name: str, run_assets, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny_run_config(
        run_assets, out, "smartfed", task=f"{name}:{data}", topk_experts=4, enable_eeqa=True, num_train=3, num_test=2
    )
    run_in_process(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == [1, 2]
    metric = {"cn_math": "final_number", "cn_code": "mbpp_pass_at_1", "math_code": "program_numeric"}[name]
    for row in rows:  # trained on the task's items, scored on its held-out ones with its own metric
        assert row["eval_metric"] == metric and row["eval_n"] == 2 and 0.0 <= row["eval_score"] <= 1.0
        assert math.isfinite(row["train_loss"]) and row["clients_replied"] == 2
