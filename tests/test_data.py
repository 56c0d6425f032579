"""The data layer: tokenizer, tasks, JSONL loading, partitions, batches (all offline, seconds)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smartfed.data import (
    IGNORE_INDEX,
    TASKS,
    Task,
    batches,
    char_tokenizer,
    encode_examples,
    format_prompt,
    list_tasks,
    load_task,
    partition_dataset,
    register_task,
)
from smartfed.data import tasks as tasks_module
from smartfed.data.tokenizer import VOCAB_SIZE

FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_tiny.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _answers_of(tokenizer, batch: dict[str, torch.Tensor]) -> list[str]:
    """Decode the supervised tokens (labels != -100) of every row."""
    return [tokenizer.decode(row[row != IGNORE_INDEX].tolist(), skip_special_tokens=True) for row in batch["labels"]]


# --------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_round_trip_and_save(tmp_path: Path, tok) -> None:
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len(tok) == VOCAB_SIZE <= 128
    text = 'Add:\n12 + 7 = {"a": 19}\t~'
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 2)
    left = char_tokenizer(padding_side="left")
    padded = left(["ab", "abcd"], padding=True)["input_ids"]
    assert padded[0][:2] == [0, 0]
    with pytest.raises(ValueError, match="'middle'"):
        char_tokenizer(padding_side="middle")


# --------------------------------------------------------------------------- tasks


def test_registry_lists_builtin_tasks() -> None:
    listed = list_tasks()
    assert {"arith", "json_arith", "copy"} <= set(listed)
    assert all(isinstance(d, str) and d and "\n" not in d for d in listed.values())
    assert TASKS["arith"].task.metric == "numeric"


@pytest.mark.parametrize("name", ["arith", "json_arith", "copy"])
def test_builtin_task_is_deterministic_disjoint_and_short(name: str) -> None:
    task, train, test = load_task(name, seed=3, num_train=200, num_test=40)
    assert task.name == name
    assert train.column_names == ["prompt", "answer", "label"] == test.column_names
    assert (len(train), len(test)) == (200, 40)
    assert not set(train["prompt"]) & set(test["prompt"])
    assert len(set(train["prompt"])) == 200
    assert max(len(p) for p in [*train["prompt"], *test["prompt"]]) <= 24
    assert set(train["label"]) == {0, 1, 2}
    _, train2, test2 = load_task(name, seed=3, num_train=200, num_test=40)
    assert train2.to_dict() == train.to_dict() and test2.to_dict() == test.to_dict()
    _, train3, _ = load_task(name, seed=4, num_train=200, num_test=40)
    assert list(train3["prompt"]) != list(train["prompt"])


def test_builtin_answers_are_right() -> None:
    _, arith, _ = load_task("arith", seed=0, num_train=100, num_test=0)
    for row in arith:
        a, op, b = row["prompt"][:-1].partition(next(o for o in "+-*" if o in row["prompt"]))
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["answer"] == str(value) and value >= 0
        assert row["label"] == "+-*".index(op)
    _, js, _ = load_task("json_arith", seed=0, num_train=50, num_test=0)
    for row in js:
        assert row["prompt"].startswith("JSON: ")
        assert json.loads(row["answer"]) == {"answer": eval(row["prompt"][6:-1])}  # digits and one operator
    _, copy, _ = load_task("copy", seed=0, num_train=50, num_test=0)
    for row in copy:
        word = row["prompt"].removeprefix("Upper: ")
        assert row["answer"] == word.upper() and row["label"] == (len(word) - 3) // 2


def test_unknown_task_and_bad_counts() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*'arith'.*'copy'"):
        load_task("nope", seed=0)
    with pytest.raises(ValueError, match="num_train=0"):
        load_task("arith", seed=0, num_train=0)
    with pytest.raises(ValueError, match="num_test=-1"):
        load_task("arith", seed=0, num_test=-1)
    with pytest.raises(ValueError, match="distinct prompts"):
        load_task("arith", seed=0, num_train=5000)  # 1575 distinct questions exist


def test_register_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks_module, "TASKS", dict(TASKS))

    @register_task("parity", metric="exact_match", prompt_template="parity {n}?", label_field="n_mod")
    def build(num_examples: int, seed: int) -> Dataset:
        """Parity of a number."""
        ns = [(seed * 31 + i * 7) % 1000 for i in range(num_examples)]
        return Dataset.from_dict({"n": ns, "answer": [n % 2 for n in ns], "n_mod": [n % 3 for n in ns]})

    assert tasks_module.list_tasks()["parity"] == "Parity of a number."
    task, train, test = load_task("parity", seed=1, num_train=30, num_test=5)
    assert len(test) == 5
    assert task.metric == "exact_match" and train[0]["prompt"].startswith("parity ")
    assert train[0]["answer"] in {"0", "1"}
    with pytest.raises(ValueError, match="already registered"):
        register_task("parity")(build)
    with pytest.raises(ValueError, match="metric='bleu'"):
        Task("t", "{x}", "answer", "bleu", None, "d")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- JSONL


def test_jsonl_fixture_loads() -> None:
    task, train, test = load_task(FIXTURE, seed=0)
    assert task.metric == "rouge_l" and task.label_field is None and task.name == str(FIXTURE)
    assert (len(train), len(test)) == (12, 2)  # 20% of 14 records go to test
    assert {*train["label"], *test["label"]} == {0}
    assert not set(train["prompt"]) & set(test["prompt"])
    prompts = {*train["prompt"], *test["prompt"]}
    assert "Translate the sentence to French.\n\nThe cat is on the table." in prompts
    assert "What is the capital of Italy?" in prompts  # no input field
    assert "Give three tips for staying healthy." in prompts  # empty input: no "\n\n"
    _, train2, test2 = load_task(str(FIXTURE), seed=0)
    assert train2.to_dict() == train.to_dict() and test2.to_dict() == test.to_dict()
    _, train3, _ = load_task(FIXTURE, seed=0, num_train=5)
    assert len(train3) == 5


def test_jsonl_short_answers_use_exact_match(tmp_path: Path) -> None:
    path = tmp_path / "short.jsonl"
    records = [{"instruction": f"What is {i}+1?", "output": str(i + 1)} for i in range(10)]
    records.append(records[0])  # a duplicate prompt is dropped
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    task, train, test = load_task(path, seed=0)
    assert task.metric == "exact_match"
    assert (len(train), len(test)) == (8, 2)


BAD_JSONL = {
    "non_utf8": (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "b"}\n', 2, "UTF-8"),
    "invalid_json": (b'{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n', 3, "invalid JSON"),
    "no_instruction": (b'{"instruction": "a", "output": "b"}\n{"prompt": "a", "output": "b"}\n', 2, "'instruction'"),
    "no_output": (b'{"instruction": "a", "response": "b"}\n', 1, "'output'"),
    "not_object": (b'{"instruction": "a", "output": "b"}\n["a", "b"]\n', 2, "JSON object"),
    "output_not_string": (b'{"instruction": "a", "output": 3}\n', 1, "'output' must be a string"),
    "empty_instruction": (b'{"instruction": "  ", "output": "b"}\n', 1, "'instruction' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_names_file_and_line(tmp_path: Path, case: str) -> None:
    content, line, what = BAD_JSONL[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_task(path, seed=0)
    assert f"{path}:{line}:" in str(info.value) and what in str(info.value)


def test_empty_or_missing_jsonl(tmp_path: Path) -> None:
    for content in (b"", b"\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"empty\.jsonl.*no records"):
            load_task(path, seed=0)
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n')
    with pytest.raises(ValueError, match="train and test need >= 2"):
        load_task(path, seed=0)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_task(tmp_path / "missing.jsonl", seed=0)


# --------------------------------------------------------------------------- partitions


def _skew(parts: list[Dataset], num_labels: int = 3) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    total = Counter(label for p in parts for label in p["label"])
    n = sum(total.values())
    distances = []
    for p in parts:
        counts = Counter(p["label"])
        distances.append(0.5 * sum(abs(counts[k] / len(p) - total[k] / n) for k in range(num_labels)))
    return sum(distances) / len(distances)


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", 0.5), ("dirichlet", 0.1), ("dirichlet", 1.0)])
def test_partitions_cover_exactly_once(scheme: str, alpha: float) -> None:
    _, train, _ = load_task("arith", seed=0, num_train=300, num_test=0)
    parts = partition_dataset(train, 5, scheme=scheme, alpha=alpha, seed=7)  # type: ignore[arg-type]
    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    assert sorted(prompt for p in parts for prompt in p["prompt"]) == sorted(train["prompt"])
    assert all(p.column_names == train.column_names for p in parts)
    again = partition_dataset(train, 5, scheme=scheme, alpha=alpha, seed=7)  # type: ignore[arg-type]
    assert [list(p["prompt"]) for p in again] == [list(p["prompt"]) for p in parts]
    if scheme == "iid":
        assert {len(p) for p in parts} == {60}
        assert list(parts[0]["prompt"]) != list(train["prompt"][:60])  # shuffled before the contiguous shards


def test_dirichlet_is_skewed_compared_to_iid() -> None:
    _, train, _ = load_task("arith", seed=0, num_train=400, num_test=0)
    iid = partition_dataset(train, 5, scheme="iid", seed=0)
    dirichlet = partition_dataset(train, 5, scheme="dirichlet", alpha=0.1, seed=0)
    assert _skew(iid) < 0.1 < 0.3 < _skew(dirichlet)


def test_partition_errors() -> None:
    ds = Dataset.from_dict({"prompt": [str(i) for i in range(6)], "answer": ["a"] * 6, "label": [0, 1, 2] * 2})
    cases = [
        ({"num_partitions": 0}, "num_partitions=0"),
        ({"num_partitions": 7}, "num_partitions=7"),
        ({"num_partitions": 2, "scheme": "pathological"}, "scheme='pathological'"),
        ({"num_partitions": 2, "alpha": 0.0}, "alpha=0.0"),
        ({"num_partitions": 2, "alpha": math.nan}, "alpha=nan"),
        ({"num_partitions": 2, "scheme": "dirichlet", "partition_by": "topic"}, "partition_by='topic'"),
    ]
    for kwargs, message in cases:
        num = kwargs.pop("num_partitions")
        with pytest.raises(ValueError, match=message):
            partition_dataset(ds, num, **kwargs)
    # One label value, ten partitions, alpha 0.1: flwr's 11 redraws (x our 4 seeds) never fill them all.
    single = Dataset.from_dict({"prompt": [str(i) for i in range(40)], "label": [0] * 40})
    with pytest.raises(ValueError, match=r"alpha=0\.1\) over 1 value\(s\) of 'label' left some of the 10 partitions"):
        partition_dataset(single, 10, scheme="dirichlet", alpha=0.1)
    with pytest.raises(TypeError, match="list"):
        partition_dataset([1, 2, 3], 2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- encoding and batches


def test_labels_mask_prompt_and_padding(tok) -> None:
    prompts, answers = ["12+7=", "Upper: abcdefgh"], ["19", "ABCDEFGH"]
    batch = encode_examples(tok, prompts, answers)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        n_prompt = 1 + len(prompt)  # <s> + one token per character
        n_total = n_prompt + len(answer) + 1  # + </s>
        assert mask[i].tolist() == [1] * n_total + [0] * (ids.shape[1] - n_total)
        supervised = (labels[i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert supervised == list(range(n_prompt, n_total))
        assert torch.equal(labels[i, n_prompt:n_total], ids[i, n_prompt:n_total])
        assert ids[i, n_total - 1] == tok.eos_token_id
        assert (ids[i, n_total:] == tok.pad_token_id).all()
        assert tok.decode(ids[i, :n_prompt], skip_special_tokens=True) == prompt
    assert _answers_of(tok, batch) == answers


def test_truncation_keeps_the_answer(tok) -> None:
    batch = encode_examples(tok, ["x" * 50 + "END"], ["ANSWER"], max_length=16)
    assert batch["input_ids"].shape == (1, 16)
    assert tok.decode(batch["input_ids"][0].tolist(), skip_special_tokens=True) == "xxxxxxEND" + "ANSWER"
    assert _answers_of(tok, batch) == ["ANSWER"]
    long_answer = encode_examples(tok, ["q"], ["A" * 40], max_length=8)
    assert long_answer["input_ids"].shape == (1, 8) and _answers_of(tok, long_answer) == ["A" * 7]
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        encode_examples(tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="max_length=1"):
        encode_examples(tok, ["a"], ["c"], max_length=1)


def test_long_inputs_are_cut_before_tokenizing(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 MB prompt and answer: only text_bound(max_length) characters reach the tokenizer, same tokens kept."""
    from smartfed.data.collate import text_bound

    prompt = "".join(chr(ord("a") + i % 26) for i in range(2_000_000)) + "END"
    answer = "B" * 1_000_000
    seen: list[int] = []
    call = type(tok).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    batch = encode_examples(tok, [prompt], [answer], max_length=16)
    assert seen and max(seen) <= text_bound(16)
    monkeypatch.undo()
    # the same row as tokenizing everything: the prompt's last token and the answer's first 15
    full_prompt = tok(prompt)["input_ids"]
    full_answer = tok(answer, add_special_tokens=False)["input_ids"][:15]
    assert batch["input_ids"][0].tolist() == full_prompt[-1:] + full_answer
    assert _answers_of(tok, batch) == ["B" * 15]


def test_chat_template_is_applied() -> None:
    tok = char_tokenizer()
    assert format_prompt(tok, "1+1=") == "1+1="
    tok.chat_template = CHAT_TEMPLATE
    text = format_prompt(tok, "1+1=")
    assert text == "<s>[user] 1+1=\n[assistant] "
    batch = encode_examples(tok, ["1+1="], ["2"])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1  # the template's <s>, no second one from the tokenizer
    assert tok.decode(ids, skip_special_tokens=False) == text + "2</s>"
    assert _answers_of(tok, batch) == ["2"]


def test_batches_are_reproducible_and_reshuffle_each_epoch(tok) -> None:
    ds = Dataset.from_dict({"prompt": [f"q{i}" for i in range(8)], "answer": [f"a{i}" for i in range(8)]})

    def run(seed: int) -> list[list[str]]:
        return [_answers_of(tok, b) for b in batches(ds, tok, batch_size=4, steps=6, seed=seed)]

    first = run(0)
    assert len(first) == 6 and all(len(b) == 4 for b in first)
    assert first == run(0)
    assert first != run(1)
    epochs = [first[0] + first[1], first[2] + first[3], first[4] + first[5]]
    assert all(sorted(e) == [f"a{i}" for i in range(8)] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # a new order per epoch
    assert list(batches(ds, tok, batch_size=4, steps=0, seed=0)) == []
    big = next(batches(ds, tok, batch_size=20, steps=1, seed=0))
    assert big["input_ids"].shape[0] == 20
    with pytest.raises(ValueError, match="batch_size=0"):
        batches(ds, tok, batch_size=0, steps=1, seed=0)


def test_batch_trains_a_tiny_llama(tok) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    _, train, _ = load_task("copy", seed=0, num_train=16, num_test=0)
    batch = next(batches(train, tok, batch_size=8, steps=1, seed=0))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
