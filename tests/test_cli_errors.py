"""Issue 15 §4/§7: errors of `generate`, `eval` and `export` on a finished run are one line, exit 2."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import smartfed.serving.inference
from smartfed.cli import app
from smartfed.more import LoraPool, MoreConfig, attach_more
from smartfed.run.folder import RunFolder
from smartfed.serving.export import check_rank

from .conftest import tiny_llama
from .test_inference import finished_run


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> dict[str, Any]:
    return finished_run(tmp_path_factory)


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


def _copy_run(fed: dict[str, Any], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(fed["run"], run)
    return run


def test_generate_refuses_an_empty_prompt(fed):
    for prompt in ("", "   \n"):
        result = CliRunner().invoke(app, ["generate", str(fed["run"]), "--prompt", prompt])
        assert result.exit_code == 2, result.output
        assert "--prompt is empty" in _error_line(result.output)
    debug = CliRunner().invoke(app, ["generate", str(fed["run"]), "--prompt", "", "--debug"])
    assert debug.exit_code == 1 and isinstance(debug.exception, ValueError)  # --debug keeps the exception


def test_eval_of_a_checkpoint_missing_a_key_is_one_line(fed, tmp_path):
    run = _copy_run(fed, tmp_path)
    folder = RunFolder(run)
    last = folder.last_checkpoint()
    tensors, payload = folder.load_checkpoint(last)
    dropped = sorted(k for k in tensors if ".router." in k)[0]
    del tensors[dropped]
    folder.save_checkpoint(last, tensors, payload)
    result = CliRunner().invoke(app, ["eval", str(run), "--limit", "1"])
    assert result.exit_code == 2, result.output
    line = _error_line(result.output)
    assert folder.checkpoint_path(last).name in line and dropped in line


def test_eval_into_an_unwritable_folder_is_one_line(fed, tmp_path):
    run = _copy_run(fed, tmp_path)
    shutil.rmtree(run / "eval", ignore_errors=True)
    (run / "eval").write_text("a file where eval/ should be")
    result = CliRunner().invoke(app, ["eval", str(run), "--limit", "1"])
    assert result.exit_code == 2, result.output
    assert str(run / "eval") in _error_line(result.output)


def test_a_key_error_is_one_line_naming_the_key(monkeypatch, tmp_path):
    def missing(*args, **kwargs):
        raise KeyError("model.layers.0.self_attn.q_proj.router.weight")

    monkeypatch.setattr(smartfed.serving.inference, "load", missing)
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert _error_line(result.output) == "error: KeyError: 'model.layers.0.self_attn.q_proj.router.weight'"
    debug = CliRunner().invoke(app, ["eval", str(tmp_path), "--debug"])
    assert isinstance(debug.exception, KeyError)


def test_export_into_an_unwritable_folder_is_one_line(fed, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    output = blocker / "adapter"
    result = CliRunner().invoke(app, ["export", str(fed["run"]), "--rank", "2", "--output", str(output), "--no_eval"])
    assert result.exit_code == 2, result.output
    line = _error_line(result.output)
    assert str(output) in line and "is a file, not a folder" in line


def test_export_rank_above_every_matrix_rank_is_one_line(fed, tmp_path):
    output = tmp_path / "adapter"
    args = ["export", str(fed["run"]), "--rank", "1000000", "--output", str(output), "--no_eval"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    line = _error_line(result.output)
    assert "rank=1000000 (--rank) exceeds" in line and re.search(r"use --rank <= \d+", line)
    assert not output.exists()


def test_check_rank_bound_is_the_largest_min_d_out_d_in(two_adapters):
    model = attach_more(tiny_llama(), LoraPool.load(two_adapters), MoreConfig(top_k=2))
    # tiny Llama: q_proj 32 × 32, v_proj 16 × 32 (two KV heads): the largest bound is 32
    check_rank(model, 32)
    with pytest.raises(ValueError, match=r"rank=33 \(--rank\) exceeds .* = 32 .*q_proj.*--rank <= 32"):
        check_rank(model, 33)
    with pytest.raises(ValueError, match=r"rank=0 \(--rank\) must be a positive int"):
        check_rank(model, 0)
