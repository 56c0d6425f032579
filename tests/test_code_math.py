"""The code skill and the code_math composite: data, scoring by running solve() in the sandbox, sharding, zoo."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from smartfed.data import list_tasks, load_task
from smartfed.data.composite import CODE_PREFIX, COMPOSITES, SKILLS, shard_of, solve_program
from smartfed.eval import solve
from smartfed.eval.metrics import METRICS, program_value
from smartfed.eval.solve import ProgramError, literal_return, reference_value, run_solve

REF_68 = "def solve():\n    return 68"


@pytest.fixture(autouse=True)
def _fresh_cache():
    solve.clear_cache()
    yield
    solve.clear_cache()


def _problem(prompt: str) -> tuple[int, str, int]:
    """'Write solve() for: What is 23 + 45?' -> (23, '+', 45)."""
    assert prompt.startswith(CODE_PREFIX + "What is ") and prompt.endswith("?")
    a, op, b = prompt[len(CODE_PREFIX + "What is ") : -1].split()
    return int(a), op, int(b)


# --------------------------------------------------------------------------- registration and data


def test_code_and_code_math_are_registered():
    tasks = list_tasks()
    assert "code" in tasks and "code_math" in tasks
    assert SKILLS["code"] == "code"
    assert COMPOSITES["code_math"] == ("code", "math")
    assert "program_value" in METRICS
    for name in ("code", "code_math"):
        task, _, _ = load_task(name, seed=0, num_train=4, num_test=2)
        assert task.metric == "program_value"


def test_code_skill_answers_word_questions_with_a_literal_solve():
    _, train, test = load_task("code", seed=0, num_train=300, num_test=50)
    for prompt, answer in zip([*train["prompt"], *test["prompt"]], [*train["answer"], *test["answer"]], strict=True):
        assert prompt.startswith(CODE_PREFIX)
        assert not any(op in prompt for op in (" + ", " - ", " * "))  # no arithmetic in the skill
        assert answer.startswith("def solve():\n    return ")
        value = literal_return(answer)
        if "How many letters" in prompt:
            assert value == len(prompt.split("'")[1])
        elif "capital letters" in prompt:
            assert value == prompt.split("'")[1].upper()
        elif "first letter" in prompt:
            assert value == prompt.split("'")[1][0]
        else:
            x, y = (int(w.strip(",?")) for w in prompt.split() if w.strip(",?").isdigit())
            assert value == max(x, y)
    assert not set(train["prompt"]) & set(test["prompt"])


def test_code_math_items_are_the_arithmetic_as_a_program():
    _, train, test = load_task("code_math", seed=0, num_train=50, num_test=20)
    for prompt, answer in zip([*train["prompt"], *test["prompt"]], [*train["answer"], *test["answer"]], strict=True):
        a, op, b = _problem(prompt)
        expected = a + b if op == "+" else a - b if op == "-" else a * b
        assert answer == solve_program(expected) and literal_return(answer) == expected


# --------------------------------------------------------------------------- sharding


def test_no_heldout_code_math_problem_is_in_any_training_set():
    held = {_problem(p) for p in load_task("code_math", seed=0, num_train=10, num_test=220)[2]["prompt"]}
    assert len(held) == 220 and all(shard_of(p) == "heldout" for p in held)
    for seed in (0, 1, 2):
        _, train, _ = load_task("code_math", seed=seed, num_train=300, num_test=220)
        trained = {_problem(p) for p in train["prompt"]}
        assert all(shard_of(p) == "composite" for p in trained)
        assert not held & trained
        _, math_train, _ = load_task("math", seed=seed, num_train=1500, num_test=100)
        math_problems = {tuple(p[len("What is ") : -1].split()) for p in math_train["prompt"]}
        assert not {(str(a), op, str(b)) for a, op, b in held} & math_problems


def test_heldout_items_are_the_same_for_every_seed_and_match_json_math():
    tests = [load_task("code_math", seed=s, num_train=20, num_test=220)[2] for s in (0, 1, 7)]
    assert tests[0]["prompt"] == tests[1]["prompt"] == tests[2]["prompt"]
    assert tests[0]["answer"] == tests[2]["answer"]
    trains = [load_task("code_math", seed=s, num_train=20, num_test=220)[1]["prompt"] for s in (0, 1)]
    assert trains[0] != trains[1]
    json_held = load_task("json_math", seed=0, num_train=1, num_test=220)[2]["prompt"]
    assert [p[len(CODE_PREFIX) :] for p in tests[0]["prompt"]] == [
        p.removesuffix(" Answer in JSON.") for p in json_held
    ]
    skill = [load_task("code", seed=s, num_train=20, num_test=50)[2]["prompt"] for s in (0, 3)]
    assert skill[0] == skill[1]


# --------------------------------------------------------------------------- scoring by execution


@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        (REF_68, 1.0),
        ("def solve():\n    return 23 + 45", 1.0),  # an expression is run, not compared as text
        ("def solve():\n    x = 23\n    return x + 45\n", 1.0),
        ("def solve():\n    return 68.0", 1.0),
        ("```python\ndef solve():\n    return 68\n```", 1.0),  # a fenced answer is unwrapped
        ("def solve():\n    return 67", 0.0),  # wrong
        ("def solve():\n    return '68'", 0.0),  # a string is not the number
        ("def solve():\n    return True", 0.0),
        ("68", 0.0),  # no solve()
        ("def solve():\n    return 1 / 0", 0.0),  # crashes
        ("def solve(:\n    return 68", 0.0),  # syntax error
        ("def solve():\n    return object()", 0.0),  # not a literal
        ("print('@@smartfed-solve@@68')\ndef solve():\n    raise SystemExit(0)", 0.0),  # a forged mark is not a value
    ],
)
def test_program_value_runs_the_prediction(pred, expected):
    assert program_value(pred, REF_68) == expected


def test_string_answers_compare_exactly():
    ref = solve_program("APPLE")
    assert program_value("def solve():\n    return 'apple'.upper()", ref) == 1.0
    assert program_value('def solve():\n    return "APPLE"', ref) == 1.0
    assert program_value("def solve():\n    return 'apple'", ref) == 0.0


def test_a_looping_program_times_out_and_scores_zero(monkeypatch):
    monkeypatch.setattr(solve, "SOLVE_TIMEOUT_S", 0.5)
    started = time.monotonic()
    assert program_value("def solve():\n    while True:\n        pass", REF_68) == 0.0
    assert time.monotonic() - started < 5.0
    with pytest.raises(ProgramError, match="timeout"):
        run_solve("def solve():\n    while True:\n        pass")
    assert not solve._cache  # a timeout is never remembered


def test_a_crashing_program_says_why():
    with pytest.raises(ProgramError, match="ZeroDivisionError"):
        run_solve("def solve():\n    return 1 / 0")
    with pytest.raises(ProgramError, match="NameError"):
        run_solve("def other():\n    return 1")


def test_outcomes_are_remembered_per_program():
    assert run_solve(REF_68) == 68
    assert len(solve._cache) == 1
    assert run_solve(REF_68) == 68  # from the cache
    assert len(solve._cache) == 1


def test_references_are_read_without_running_and_a_broken_one_is_an_error(monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("a literal reference must not be run")

    monkeypatch.setattr(solve, "run_python", no_run)
    assert reference_value(REF_68) == 68
    assert reference_value(solve_program("k")) == "k"
    monkeypatch.undo()
    assert reference_value("def solve():\n    return 60 + 8") == 68  # another form is run
    with pytest.raises(ValueError, match="reference program"):
        program_value(REF_68, "def solve():\n    return 1 / 0")


def test_chance_answers_score_through_the_same_metric():
    from smartfed.eval.programs import per_example_scores

    _, train, test = load_task("code_math", seed=0, num_train=30, num_test=20)
    most = max(set(train["answer"]), key=list(train["answer"]).count)
    scores = per_example_scores("program_value", [most] * len(test), test)
    assert len(scores) == 20 and set(scores) <= {0.0, 1.0}
    assert sum(scores) == sum(literal_return(a) == literal_return(most) for a in test["answer"])


# --------------------------------------------------------------------------- the zoo


def test_zoo_table_shows_compositions_added_later_and_the_base():
    from rich.console import Console

    from smartfed.cli.adapters import _zoo_table

    manifest = {
        "adapters": {
            "math": {"task": "math", "scores": {"math": 0.68, "json_math": 0.0}, "bytes": 2**21},
            "code": {"task": "code", "scores": {"code": 0.9, "json_math": 0.0, "code_math": 0.05}, "bytes": 2**21},
        },
        "base_scores": {"math": 0.0, "code": 0.1, "json_math": 0.0, "code_math": 0.02},
    }
    table = _zoo_table(manifest, title="zoo")
    assert [c.header for c in table.columns] == ["adapter", "own skill", "json_math", "code_math", "MB"]
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "code 0.900" in text and "0.050" in text and "–" in text and "base" in text


@pytest.mark.slow
def test_building_one_skill_keeps_the_other_adapters_byte_for_byte(tmp_path):
    from smartfed.zoo import MANIFEST, ZooConfig, build_zoo

    from .conftest import save_tiny_assets

    model_dir, a, b = save_tiny_assets(tmp_path / "assets")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name, path in (("math", a), ("json", b)):
        shutil.copytree(path, zoo / name)
    old = {
        "command": "smartfed zoo build --skills math,json",
        "config": {"skills": "math,json"},
        "adapters": {
            name: {"command": "smartfed zoo build --skills math,json", "task": task, "scores": {task: 0.5}}
            for name, task in (("math", "math"), ("json", "json_format"))
        },
        "base_scores": {"math": 0.0, "json_format": 0.0, "json_math": 0.125},
    }
    (zoo / MANIFEST).write_text(json.dumps(old))
    before = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file() and p.name != MANIFEST}
    config = ZooConfig(base_model=str(model_dir), skills="code", steps=2, batch_size=2, rank=2, num_train=8, num_test=2)
    manifest = build_zoo(config, zoo, command="smartfed zoo build --skills code")
    after = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert {k: v for k, v in after.items() if k.parts[0] != "code"} == before
    written = json.loads((zoo / MANIFEST).read_text())
    assert written == manifest
    for name in ("math", "json"):
        assert written["adapters"][name] == old["adapters"][name] | {"config": {"skills": "math,json"}}
    code = written["adapters"]["code"]
    assert code["task"] == "code" and code["command"] == "smartfed zoo build --skills code"
    assert set(code["scores"]) == {"code", *COMPOSITES} and len(code["data_sha256"]) == 64
    assert {"code", "code_math", "math"} <= set(written["base_scores"])
    assert written["base_scores"]["json_math"] != 0.125  # another base: scored again
    assert (zoo / "code" / "adapter_model.safetensors").is_file()


def test_an_earlier_base_score_is_reused_only_for_the_same_items():
    from smartfed.zoo import ZooConfig, _same_scoring

    config = ZooConfig(skills="code")
    earlier = {"base_model": "smollm2-135m", "num_test": 100, "seed": 0, "skills": "spanish", "steps": 7}
    assert _same_scoring(earlier, config)
    assert not _same_scoring({**earlier, "num_test": 50}, config)
    assert not _same_scoring({**earlier, "base_model": "other"}, config)
    assert not _same_scoring(None, config)
