"""smartfed.load, load_router_file, and the `generate` / `eval` commands on one tiny finished federation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import smartfed
from smartfed.cli import app
from smartfed.data import load_task
from smartfed.eval import numeric_match
from smartfed.fl.simulation import run_simulation
from smartfed.more import LoraPool, MoreConfig, attach_more
from smartfed.run.config import RunConfig
from smartfed.run.folder import RunFolder

from .conftest import save_tiny_assets

FIXTURES = Path(__file__).parent / "fixtures"
_SHARED: dict[str, Any] = {}


def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny federation for the whole session (4 clients, 2 rounds, EEQA on), shared by both test files."""
    if not _SHARED:
        root = tmp_path_factory.mktemp("finished")
        model_dir, a, b = save_tiny_assets(root)
        run = root / "run"
        run_config = RunConfig(
            model_name_or_path=str(model_dir),
            lora_pool=f"{a},{b}",
            task="arith",
            num_clients=4,
            sample_clients=2,
            num_rounds=2,
            local_steps=3,
            batch_size=8,
            learning_rate=5e-2,
            topk_experts=4,
            enable_eeqa=True,
            num_train=32,
            num_test=8,
            max_length=32,
            max_new_tokens=4,
            energy="none",
            seed=7,
            output_dir=str(run),
        )
        run_simulation(run_config, progress=False)
        _SHARED.update(root=root, model=model_dir, adapters=(a, b), run=run, config=run_config)
    return _SHARED


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> dict[str, Any]:
    return finished_run(tmp_path_factory)


def _ids() -> torch.Tensor:
    return torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def _reference(fed: dict[str, Any]):
    """The server's final model, rebuilt by hand: attach_more + last checkpoint's routers + its quotas."""
    config: RunConfig = fed["config"]
    base = AutoModelForCausalLM.from_pretrained(fed["model"], dtype=torch.float32)
    more = attach_more(
        base,
        LoraPool.load(config.lora_pool),
        MoreConfig(top_k=config.topk_experts, router=config.router, gate=config.gate),
    )
    tensors, payload = RunFolder(fed["run"]).load_checkpoint(config.num_rounds)
    more.load_router_state_dict({k: v for k, v in tensors.items() if ".router." in k})
    more.set_quotas(payload["quotas"])
    return more.eval(), payload


def test_load_reproduces_the_servers_final_model(fed):
    loaded = smartfed.load(fed["run"])
    reference, payload = _reference(fed)
    assert loaded.round == 2 and not loaded.model.training
    assert loaded.quotas == payload["quotas"] == reference.quotas()
    assert sum(loaded.quotas.values()) == 16 and set(loaded.quotas.values()) != {4}  # EEQA moved the quotas
    model, tokenizer = loaded  # unpacks like PEFT code
    assert tokenizer.eos_token == "</s>" and loaded.config == fed["config"]
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, reference(_ids()).logits, rtol=0, atol=0)
    earlier = smartfed.load(fed["run"], checkpoint=1)
    assert earlier.round == 1


def test_changed_adapter_weights_are_refused(fed, tmp_path):
    a, b = (shutil.copytree(p, tmp_path / p.name) for p in fed["adapters"])
    moved = smartfed.load(fed["run"], pool=f"{a},{b}")  # moved but identical: fine
    assert [x.name for x in moved.pool.adapters] == ["math", "json"]

    weights = load_file(b / "adapter_model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, b / "adapter_model.safetensors")
    recorded = {x["name"]: x["sha256"] for x in RunFolder(fed["run"]).read_pool()}
    changed = LoraPool.load([a, b]).adapters[1].sha256
    with pytest.raises(ValueError, match="'json'") as info:
        smartfed.load(fed["run"], pool=[a, b])
    assert recorded["json"] in str(info.value) and changed in str(info.value)


def test_missing_pieces_raise_file_not_found(fed, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        smartfed.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        smartfed.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="round_0009"):
        smartfed.load(fed["run"], checkpoint=9)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(fed["run"] / "config.json", copy / "config.json")
    shutil.copy(fed["run"] / "pool.json", copy / "pool.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        smartfed.load(copy)
    (copy / "pool.json").unlink()
    shutil.copytree(fed["run"] / "checkpoints", copy / "checkpoints")
    with pytest.raises(FileNotFoundError, match=r"pool\.json"):
        smartfed.load(copy)
    with pytest.raises(TypeError, match="load_router_file"):
        smartfed.load(torch.nn.Linear(2, 2))


def test_load_router_file_from_save_router(fed, tmp_path):
    loaded = smartfed.load(fed["run"])
    path = loaded.model.save_router(tmp_path / "router.safetensors")
    base = AutoModelForCausalLM.from_pretrained(fed["model"], dtype=torch.float32)
    model = smartfed.load_router_file(base, list(fed["adapters"]), path, quotas=loaded.quotas)
    assert not model.training and model.quotas() == loaded.quotas
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, loaded.model(_ids()).logits, rtol=0, atol=0)
    # a model id/folder works too (the file carries the EEQA quotas), and a pool with other experts is refused
    same = smartfed.load_router_file(str(fed["model"]), fed["config"].lora_pool, path)
    assert same.quotas() == loaded.quotas
    with pytest.raises(ValueError, match="routed over 8 experts"):
        smartfed.load_router_file(str(fed["model"]), [fed["adapters"][0]], path)


def test_generate_streams_an_answer(fed):
    """The streamed text is the routed model's own greedy answer (whatever the tiny model says)."""
    from smartfed.data.collate import encode_prompt, pad_token_id

    result = CliRunner().invoke(app, ["generate", str(fed["run"]), "--prompt", "3+4=", "--max_new_tokens", "6"])
    assert result.exit_code == 0, result.output
    model, tokenizer = smartfed.load(fed["run"])
    ids = torch.tensor([encode_prompt(tokenizer, "3+4=")])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=pad_token_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )
    assert out.shape[1] > ids.shape[1]  # it generated (an end-of-sequence token counts)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.output.strip() == expected.strip()


def test_eval_writes_predictions_and_scores(fed):
    result = CliRunner().invoke(app, ["eval", str(fed["run"]), "--limit", "4"])
    assert result.exit_code == 0, result.output
    out = fed["run"] / "eval" / "arith"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["task"] == "arith" and scores["metric"] == "numeric" and scores["n"] == 4
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "reference", "prediction", "score"}
    c = fed["config"]
    _, _, test = load_task(c.task, seed=c.seed, num_train=c.num_train, num_test=c.num_test)  # the run's held-out split
    assert [r["prompt"] for r in rows] == test["prompt"][:4] and [r["reference"] for r in rows] == test["answer"][:4]
    assert [r["score"] for r in rows] == [numeric_match(r["prediction"], r["reference"]) for r in rows]
    assert scores["score"] == pytest.approx(sum(r["score"] for r in rows) / 4)

    jsonl = CliRunner().invoke(
        app, ["eval", str(fed["run"]), "--task", str(FIXTURES / "alpaca_tiny.jsonl"), "--limit", "2"]
    )
    assert jsonl.exit_code == 0, jsonl.output
    assert json.loads((fed["run"] / "eval" / "alpaca_tiny" / "scores.json").read_text())["n"] <= 2


@pytest.mark.parametrize(
    "command", [["generate", "--prompt", "hi"], ["eval"], ["export", "--rank", "2", "--output", "x"]]
)
def test_bad_run_dir_is_one_line_exit_2(command, tmp_path):
    missing = tmp_path / "no_such_run"
    result = CliRunner().invoke(app, [command[0], str(missing), *command[1:]])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and str(missing) in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
