"""Issue 15 §3/§4: a run that trains nothing fails with its reason, and every anticipated error is one line.

LocalGrid runs (the real ServerApp loop, no Ray) show what summary.json records; the CLI runs go
through Flower's simulation engine, where the error is raised in the ServerApp's thread.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smartfed.cli import app
from smartfed.errors import RunFailed
from smartfed.fl.server_app import failure_reason

from .conftest import run_in_process, tiny_run_config


def _row(round_: int, *, skipped: bool = False, loss: float | None = 1.0, reason: str = "") -> dict:
    dropped = [{"partition": 0, "node": 1, "reason": reason, "attempt": 0}] if reason else []
    return {"round": round_, "skipped": skipped, "train_loss": None if skipped else loss, "dropped": dropped}


def test_failure_reason_of_rows():
    assert failure_reason([]) is None
    assert failure_reason([_row(1), _row(2, skipped=True, reason="x")]) is None  # one round trained
    reason = failure_reason([_row(1, skipped=True, reason="'r.w' has 6 non-finite value(s)"), _row(2, skipped=True)])
    assert reason is not None and reason.startswith("every round (2) was skipped")
    assert "'r.w' has 6 non-finite value(s)" in reason
    reason = failure_reason([_row(1), _row(2, loss=math.nan), _row(3, loss=math.inf)])
    assert reason == "the training loss is not finite in round(s) [2, 3]"


def test_a_run_whose_every_round_is_skipped_records_failed_in_the_summary(run_assets, tmp_path):
    # every reply moves the router by more than 1e-12: every one is dropped, every round skipped
    config = tiny_run_config(run_assets, tmp_path / "run", "smartfed", topk_experts=4, max_update_norm=1e-12)
    run_in_process(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["reason"].startswith("every round (2) was skipped") and "max_update_norm" in summary["reason"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True]

    run_in_process(tiny_run_config(run_assets, tmp_path / "ok", "smartfed", topk_experts=4))
    ok = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert ok["status"] == "completed" and ok["reason"] is None


def _run_args(run_assets: dict[str, str], out: Path, *extra: str, method: str = "smartfed") -> list[str]:
    config = tiny_run_config(run_assets, out, method, topk_experts=4, num_rounds=1, num_clients=2)
    flags = [
        "method",
        "num_clients",
        "sample_clients",
        "num_rounds",
        "local_steps",
        "batch_size",
        "num_train",
        "num_test",
    ]
    flags += ["max_length", "max_new_tokens", "topk_experts", "energy", "output_dir"]
    args = ["run", "--model_name_or_path", config.model_name_or_path, "--lora_pool", config.lora_pool]
    for name in flags:
        args += [f"--{name}", str(getattr(config, name))]
    return args + list(extra)


def _one_error_line(output: str) -> str:
    """The single error line, besides the rounds progress bar (tqdm's \r-separated frames)."""
    lines = [line for line in re.split(r"[\r\n]", output) if line.strip() and not line.startswith("rounds:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.slow
def test_smartfed_run_that_trains_nothing_exits_2_with_the_reason(run_assets, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _run_args(run_assets, out, "--max_update_norm", "1e-12"))
    assert result.exit_code == 2, (result.output, result.exception)
    line = _one_error_line(result.output)
    assert "run failed: every round (1) was skipped" in line and str(out / "summary.json") in line
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_an_error_inside_flowers_server_app_is_one_line_exit_2(run_assets, tmp_path, monkeypatch):
    import smartfed.fl.server_app as server_app

    def disk_full(config):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "config.json"))

    # the ServerApp runs in a thread of this process (the clients in Ray's workers): a full disk
    # there, after the federation started
    monkeypatch.setattr(server_app, "get_runtime", disk_full)
    result = CliRunner().invoke(app, _run_args(run_assets, tmp_path / "run"))
    assert result.exit_code == 2, (result.output, result.exception)
    line = _one_error_line(result.output)
    assert line == f"error: [Errno 28] No space left on device: '{tmp_path / 'run' / 'config.json'}'"
    debug = CliRunner().invoke(app, [*_run_args(run_assets, tmp_path / "run2"), "--debug"])
    assert isinstance(debug.exception, OSError) and debug.exception.errno == 28  # --debug: the exception itself


def test_run_failed_is_an_anticipated_error():
    from smartfed.errors import ANTICIPATED, one_line

    assert issubclass(RunFailed, ANTICIPATED) and issubclass(RunFailed, RuntimeError)
    assert one_line(KeyError("model.router.weight")) == "KeyError: 'model.router.weight'"
    assert one_line(ValueError("two\n  lines")) == "two lines"
