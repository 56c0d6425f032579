"""``smartfed export --distill``: the static LoRA trained to match the routed model (tiny model, CPU)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import smartfed
from smartfed.cli import app
from smartfed.data import load_task
from smartfed.serving.distill import DistillConfig, answer_kl, mean_kl
from smartfed.serving.export import REPORT_FILE, export_peft, export_run

from .test_inference import finished_run


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> dict[str, Any]:
    return finished_run(tmp_path_factory)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": -1}, r"DistillConfig.steps \(--distill_steps\)=-1 must be an int >= 0"),
        ({"steps": 2.5}, r"steps.*=2.5"),
        ({"learning_rate": 0.0}, r"learning_rate.*=0.0 must be > 0"),
        ({"learning_rate": float("nan")}, r"learning_rate.*=nan must be a finite number"),
        ({"loss": "mse"}, r"DistillConfig.loss \(--distill_loss\)='mse' is not one of \['kl', 'ce', 'kl_ce'\]"),
        ({"data": "test"}, r"data.*='test' is not one of \['generated', 'answers'\]"),
        ({"batch_size": 0}, r"batch_size.*=0 must be an int >= 1"),
        ({"eval_examples": True}, r"eval_examples.*=True"),
        ({"weight_decay": -0.1}, r"weight_decay.*=-0.1 must be >= 0"),
        ({"seed": "0"}, r"seed.*='0' must be an int"),
    ],
)
def test_bad_distill_options_name_the_field_and_the_value(values, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**values)


def test_answer_kl_is_the_kl_on_the_answer_tokens_only():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.full((2, 5), -100)
    labels[0, 3:] = 1  # predicted by positions 2, 3
    labels[1, 4] = 2  # predicted by position 3
    picked = [(0, 2), (0, 3), (1, 3)]
    want = sum(
        F.kl_div(F.log_softmax(student[i, t], -1), F.log_softmax(teacher[i, t], -1), log_target=True, reduction="sum")
        for i, t in picked
    ) / len(picked)
    torch.testing.assert_close(answer_kl(student, teacher, labels), want)
    assert float(answer_kl(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_kl(student, teacher, torch.full((2, 5), -100))


def _held_batches(fed: dict[str, Any], n: int = 8) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    from smartfed.data.collate import encode_examples
    from smartfed.eval import generate_answers

    c = fed["config"]
    loaded = smartfed.load(fed["run"])
    _, train, _ = load_task(c.task, seed=c.seed, num_train=c.num_train, num_test=c.num_test)
    prompts = list(train["prompt"][:n])
    answers = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=c.max_new_tokens)
    return loaded, [encode_examples(loaded.tokenizer, prompts, answers, max_length=c.max_length)]


@pytest.mark.parametrize("loss", ["kl", "kl_ce"])
def test_distillation_lowers_the_kl_and_writes_an_adapter_that_loads_and_merges(fed, tmp_path, loss):
    out = tmp_path / "distilled"
    config = DistillConfig(steps=25, learning_rate=1e-2, loss=loss, examples=16, batch_size=4, eval_examples=8)
    _, report = export_run(fed["run"], out, rank=2, calibration=8, distill=config)
    d = report.info["distill"]
    assert d["kl_after"] < 0.8 * d["kl_before"], d  # the tiny routed model is matched better than by the SVD start
    assert d["steps"] == 25 and d["loss"] == loss and d["examples"] == 16 and d["data"] == "generated"
    written = json.loads((out / REPORT_FILE).read_text())
    assert written["distill"] == pytest.approx(d) and written["rank"] == 2 and written["round"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        REPORT_FILE,
    ]
    assert [p.name for p in out.parent.iterdir()] == ["distilled"]  # no temporary folder left
    # the adapter on disk is the trained one: its KL to the routed model on the eval examples is the recorded one
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fed["model"]), out).eval()
    routed, held = _held_batches(fed)
    assert mean_kl(exported, routed.model, held) == pytest.approx(d["kl_after"], rel=1e-2)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = exported(ids).logits
        merged = exported.merge_and_unload()
        assert not isinstance(merged, PeftModel)
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_a_failed_distillation_writes_nothing(fed, tmp_path):
    loaded = smartfed.load(fed["run"])
    gates = {name: torch.ones(layer.num_experts) for name, layer in loaded.model.more_layers().items()}

    def tune(_model: Any) -> dict[str, Any]:
        raise ValueError("distill: the loss became nan at step 3; lower --learning_rate")

    with pytest.raises(ValueError, match="nan"):
        export_peft(loaded.model, tmp_path / "exports" / "out", rank=2, gates=gates, tune=tune)
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_export_command_distills_and_scores_base_routed_svd_and_distilled(fed, tmp_path):
    out = tmp_path / "adapter"
    args = ["export", str(fed["run"]), "--rank", "2", "--output", str(out), "--calibration", "8", "--limit", "4"]
    distill = ["--distill", "--distill_steps", "5", "--distill_examples", "8", "--distill_learning_rate", "1e-2"]
    result = CliRunner().invoke(app, [*args, *distill], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "KL to the routed model" in result.output and "(SVD, the start)" in result.output
    assert "(distilled)" in result.output and "share of the routed score" in result.output
    report = json.loads((out / REPORT_FILE).read_text())
    assert set(report["scores"]) == {"base", "routed", "svd", "export"}
    assert all(s["n"] == 4 for s in report["scores"].values())
    assert report["distill"]["steps"] == 5 and report["distill"]["learning_rate"] == 1e-2
    assert report["distill"]["kl_after"] < report["distill"]["kl_before"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--distill", "--distill_loss", "mse"], "'mse' is not one of"),
        (["--distill", "--distill_steps", "-3"], "--distill_steps)=-3"),
        (["--distill_steps", "30"], "--distill_steps needs --distill"),
    ],
)
def test_bad_distill_flags_are_one_error_line_before_any_work(fed, tmp_path, extra, message):
    out = tmp_path / "never"
    args = ["export", str(fed["run"]), "--rank", "2", "--output", str(out), *extra]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()
