"""The default benchmark's tasks: disjoint shards, fixed held-out items, the JSON metric, model and zoo resolution."""

from __future__ import annotations

import json

import pytest

from smartfed.data import load_task
from smartfed.data.composite import COMPOSITES, SKILLS, _problems, shard_of
from smartfed.eval.metrics import json_answer
from smartfed.models import dequantised_copy, resolve_model
from smartfed.zoo import ZooConfig, resolve_pool


def _problem_of(prompt: str) -> str:
    """'What is 23 + 45? Answer in JSON.' / '¿Cuánto es 23 más 45?' / 'Write solve() for: What is 23 + 45?' -> '23 + 45'."""
    words = prompt.replace("?", " ").replace("¿", " ").split()
    numbers = [i for i, w in enumerate(words) if w.isdigit()]
    op = {"más": "+", "menos": "-", "por": "*"}.get(words[numbers[0] + 1], words[numbers[0] + 1])
    return f"{words[numbers[0]]} {op} {words[numbers[1]]}"


def test_shards_partition_every_problem():
    shards = [shard_of(p) for p in _problems()]
    counts = {s: shards.count(s) for s in ("skill", "composite", "heldout")}
    assert sum(counts.values()) == len(_problems())
    assert counts["heldout"] > 1000 and counts["composite"] > 1000 and counts["skill"] > 5000


def test_no_heldout_problem_is_trained_anywhere():
    trained = set()
    for task in ("math", "json_math", "spanish_math", "code_math"):
        for seed in (0, 1, 2):
            _, train, _ = load_task(task, seed=seed, num_train=1500, num_test=220)
            trained |= {_problem_of(p) for p in train["prompt"]}
    for task in COMPOSITES:
        _, _, test = load_task(task, seed=0, num_train=10, num_test=220)
        held = {_problem_of(p) for p in test["prompt"]}
        assert len(held) == 220
        assert not held & trained


def test_heldout_items_do_not_depend_on_the_seed():
    tests = [load_task("json_math", seed=s, num_train=50, num_test=220)[2]["prompt"] for s in (0, 1, 7)]
    assert tests[0] == tests[1] == tests[2]
    trains = [load_task("json_math", seed=s, num_train=50, num_test=220)[1]["prompt"] for s in (0, 1)]
    assert trains[0] != trains[1]


def test_composites_pair_their_skills_with_matching_phrasing():
    _, _, math = load_task("math", seed=0, num_train=10, num_test=5)
    _, train, test = load_task("json_math", seed=0, num_train=10, num_test=5)
    assert all(p.endswith(" Answer in JSON.") and p.startswith("What is ") for p in test["prompt"])
    assert all(json.loads(a)["answer"] == int(json.loads(a)["answer"]) for a in train["answer"])
    assert all(p.startswith("What is ") and not p.endswith("JSON.") for p in math["prompt"])
    _, json_train, _ = load_task("json_format", seed=0, num_train=200, num_test=5)
    assert not any(any(op in p for op in (" + ", " - ", " * ")) for p in json_train["prompt"])  # no arithmetic
    assert set(SKILLS) == {"math", "json", "spanish", "code"}


def test_too_many_items_is_a_clear_error():
    with pytest.raises(ValueError, match="json_math"):
        load_task("json_math", seed=0, num_train=10**6, num_test=10)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ('{"answer": 68}', '{"answer": 68}', 1.0),
        ('{ "answer" : 68.0 } and more', '{"answer": 68}', 1.0),
        ('Sure: {"answer": 68}', '{"answer": 68}', 1.0),
        ("68", '{"answer": 68}', 0.0),
        ('{"answer": "68"}', '{"answer": 68}', 0.0),
        ('{"answer": 67}', '{"answer": 68}', 0.0),
        ('{"answer": 68', '{"answer": 68}', 0.0),
        ('{"result": 68}', '{"answer": 68}', 0.0),
        ('{"answer": "APPLE"}', '{"answer": "APPLE"}', 1.0),
        ('{"answer": "apple"}', '{"answer": "APPLE"}', 0.0),
        ('{"answer": true}', '{"answer": 1}', 0.0),
    ],
)
def test_json_answer_metric(pred, ref, expected):
    assert json_answer(pred, ref) == expected


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match=r"model\.gguf.*not a GGUF"):
        resolve_model(str(bad))
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        dequantised_copy(tmp_path / "missing.gguf")


def test_a_gguf_header_without_a_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTFED_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"empty\.gguf.*cannot load"):
        resolve_model(str(bad))
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-written


def test_other_names_pass_through():
    assert resolve_model("some/hub-id") == "some/hub-id"


def test_zoo_names_resolve_from_the_manifest(tmp_path):
    (tmp_path / "math").mkdir()
    (tmp_path / "json").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"adapters": {"math": {}, "json": {}}}))
    assert resolve_pool("zoo:math,/x/y", tmp_path) == f"{tmp_path / 'math'},/x/y"
    assert resolve_pool("zoo:", tmp_path) == f"{tmp_path / 'json'},{tmp_path / 'math'}"
    assert resolve_pool("/a,/b", tmp_path) == "/a,/b"
    with pytest.raises(ValueError, match="zoo:code"):
        resolve_pool("zoo:code", tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest"):
        resolve_pool("zoo:math", tmp_path / "nowhere")


def test_zoo_config_validates():
    with pytest.raises(ValueError, match="skills='nope'"):
        ZooConfig(skills="nope")
    assert ZooConfig(skills="code").skill_list() == ["code"]
    with pytest.raises(ValueError, match="steps=0"):
        ZooConfig(steps=0)
