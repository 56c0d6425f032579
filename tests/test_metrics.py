"""Metrics with known answers, greedy generation on a tiny random Llama, task evaluation."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smartfed.data import char_tokenizer, load_task
from smartfed.data.tasks import MetricName
from smartfed.eval import (
    METRICS,
    evaluate_task,
    exact_match,
    first_number,
    generate_answers,
    numeric_match,
    rouge_l,
    score,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------- metrics


def test_exact_match() -> None:
    assert exact_match("  19\n", "19") == 1.0
    assert exact_match('{"answer":  19}', '{"answer": 19}') == 1.0  # whitespace runs collapse
    assert exact_match("abc", "ABC") == 0.0  # case counts
    assert exact_match("19.", "19") == 0.0


def test_numeric_match() -> None:
    assert numeric_match("The answer is 19.", "19") == 1.0
    assert numeric_match("19.0", "19") == 1.0
    assert numeric_match("-4 apples", "-4") == 1.0
    assert numeric_match("total: 1,234", "1234") == 1.0
    assert numeric_match('{"answer": 207}', "207") == 1.0
    assert numeric_match("20", "19") == 0.0
    assert numeric_match("no idea", "19") == 0.0
    assert numeric_match("19", "nineteen") == 0.0
    assert numeric_match("3 then 19", "19") == 0.0  # the first number counts
    assert first_number("x=.5") == 0.5 and first_number("1e3 m") == 1000.0 and first_number("none") is None


def test_rouge_l() -> None:
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat sat", "dogs bark loudly") == 0.0
    partial = rouge_l("the cat sat", "the cat sat on the mat")
    assert 0.0 < partial < 1.0 and partial == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "something") == 0.0


def test_score_and_registry() -> None:
    assert set(METRICS) == set(get_args(MetricName))
    assert score("exact_match", ["a", "b", "c", "d"], ["a", "b", "x", "y"]) == 0.5
    assert score("numeric", ["It is 19.", "7"], ["19", "8"]) == 0.5
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'.*'exact_match'"):
        score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        score("rouge_l", [], [])


# --------------------------------------------------------------------------- generation


def test_generate_answers_on_tiny_llama_is_bounded_and_deterministic() -> None:
    model, tok = tiny_llama(), char_tokenizer()
    prompts = ["12+7=", "Upper: abcdefgh", "3*4=", "JSON: 10-2=", "x"]
    first = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert len(first) == len(prompts)
    assert all(isinstance(a, str) and len(a) <= 6 for a in first)  # at most one character per token
    assert generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=2) == first
    # Left padding is right: answering alone or in a padded batch gives the same tokens.
    assert generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=1) == first
    assert tok.padding_side == "right"
    model.train()
    generate_answers(model, tok, prompts[:1], max_new_tokens=2)
    assert model.training  # mode restored
    assert generate_answers(model, tok, [], max_new_tokens=2) == []
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_answers(model, tok, prompts, max_new_tokens=0)


class OracleModel:
    """A ``.generate`` that reads each (left-padded) prompt and appends its arithmetic answer, eos, then junk."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[torch.Tensor] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kwargs):
        self.calls.append(attention_mask)
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            assert mask == sorted(mask)  # padding is on the left
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
            answer = str(eval(prompt.removesuffix("=")))  # "12+7" -> 19, digits and one operator only
            new = [*self.tokenizer(answer, add_special_tokens=False)["input_ids"], kwargs["eos_token_id"]]
            new = (new + self.tokenizer("zz", add_special_tokens=False)["input_ids"])[:max_new_tokens]
            rows.append(ids + new + [kwargs["pad_token_id"]] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_evaluate_task_with_an_oracle_scores_one() -> None:
    tok = char_tokenizer()
    task, _, test = load_task("arith", seed=0, num_train=8, num_test=20)
    oracle = OracleModel(tok)
    assert generate_answers(oracle, tok, ["2+3=", "12*12="], max_new_tokens=8) == ["5", "144"]
    result = evaluate_task(oracle, tok, task, test, max_new_tokens=8, batch_size=8)
    assert result == {"score": 1.0, "n": 20.0}
    assert [m.shape[0] for m in oracle.calls[1:]] == [8, 8, 4]
    assert evaluate_task(oracle, tok, task, test, limit=5)["n"] == 5.0
    assert evaluate_task(oracle, tok, task, test, limit=0) == {"score": 0.0, "n": 0.0}


def test_evaluate_task_on_tiny_llama_with_chat_template() -> None:
    model, tok = tiny_llama(), char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    task, _, test = load_task("copy", seed=0, num_train=8, num_test=6)
    result = evaluate_task(model, tok, task, test, max_new_tokens=4, batch_size=4)
    preds = generate_answers(model, tok, list(test["prompt"]), max_new_tokens=4, batch_size=4)  # through the template
    assert set(result) == {"score", "n"} and result["n"] == 6.0
    assert result["score"] == pytest.approx(score(task.metric, preds, list(test["answer"])))
    assert all(isinstance(v, float) for v in result.values())
