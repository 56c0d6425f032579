"""The command line: the demo runs and composes, `pool inspect` reports and refuses bad input."""

from __future__ import annotations

import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from smartfed.cli import app
from smartfed.demo import run_demo


def test_demo_router_beats_single_adapters_and_merge():
    console = Console(record=True, width=120)
    result = run_demo(console, seed=0)
    acc = result.accuracy
    more = next(v for k, v in acc.items() if k.startswith("MoRE"))
    singles = [v for k, v in acc.items() if k.startswith("adapter")]
    assert more > max(singles) + 0.2
    assert more > acc["sum merge of both"] + 0.2
    assert result.router_losses[-1] < result.router_losses[0]
    assert "Held-out accuracy" in console.export_text()


def test_pool_inspect(two_adapters):
    result = CliRunner().invoke(app, ["pool", "inspect", *map(str, two_adapters)])
    assert result.exit_code == 0, result.output
    assert "math" in result.output and "json" in result.output and "4 target matrices" in result.output


def test_pool_inspect_bad_path(tmp_path):
    result = CliRunner().invoke(app, ["pool", "inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "missing" in result.output and "Traceback" not in result.output


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output and "pool" in result.output


def test_pool_inspect_title_keeps_the_adapter_names(two_adapters):
    result = CliRunner().invoke(app, ["pool", "inspect", *map(str, two_adapters)], terminal_width=200)
    assert result.exit_code == 0, result.output
    title = next(line for line in result.output.splitlines() if "LoraPool(" in line)
    assert "[math(r=4), json(r=2)]" in title, title  # rich used to read "[...]" as markup and drop it


def test_typer_never_prints_local_variables(monkeypatch, capsys):
    import sys

    import typer.main

    import smartfed.more
    from smartfed.cli import pool_app, zoo_app

    for typer_app in (app, pool_app, zoo_app):
        assert typer_app.pretty_exceptions_show_locals is False

    # the flag above is what typer's rich traceback reads: an unexpected error's frame keeps a local out of it
    def leaky_load(sources):
        secret_local = "-".join(["hf", "not", "for", "the", "log"])  # noqa: F841 (the traceback shows the source line)
        raise RuntimeError("boom")

    monkeypatch.setattr(smartfed.more.LoraPool, "load", staticmethod(leaky_load))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # Typer.__call__ installs its own hook
    monkeypatch.delenv("TYPER_STANDARD_TRACEBACK", raising=False)
    monkeypatch.delenv("_TYPER_STANDARD_TRACEBACK", raising=False)
    with pytest.raises(RuntimeError, match="boom") as info:
        app(["pool", "inspect", "x"], prog_name="smartfed", standalone_mode=False)
    capsys.readouterr()
    typer.main.except_hook(RuntimeError, info.value, info.value.__traceback__)
    shown = capsys.readouterr().err
    assert "boom" in shown and "hf-not-for-the-log" not in shown
    config = getattr(info.value, typer.main._typer_developer_exception_attr_name)
    config.pretty_exceptions_show_locals = True  # the same traceback with the flag on does print it
    typer.main.except_hook(RuntimeError, info.value, info.value.__traceback__)
    assert "hf-not-for-the-log" in capsys.readouterr().err


# --- issue 15 §3: values that cannot train are refused at start -----------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", float("inf"), "learning_rate=inf must be a finite number > 0"),
        ("learning_rate", float("nan"), "learning_rate=nan must be a finite number > 0"),
        ("learning_rate", 0.0, "learning_rate=0.0 must be a finite number > 0"),
        ("learning_rate", -1e-3, "learning_rate=-0.001 must be a finite number > 0"),
        ("weight_decay", float("inf"), "weight_decay=inf must be a finite number >= 0"),
        ("lora_alpha", float("inf"), "lora_alpha=inf must be a finite number > 0"),
        ("alpha", float("nan"), "alpha=nan must be a finite number > 0"),
        ("max_length", 1, "max_length=1 leaves no room for the answer"),
    ],
)
def test_run_config_refuses_values_that_cannot_train(field, value, message):
    from smartfed.run.config import RunConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(**{field: value})


def test_method_options_that_cannot_train_are_refused():
    from dataclasses import dataclass

    from smartfed.methods.base import parse_options

    @dataclass
    class Options:
        lr: float = 1e-3

    for raw in ("inf", "nan", "-inf"):
        with pytest.raises(ValueError, match=rf"'demo'.*lr='{raw}' is not a valid finite number"):
            parse_options(Options, f"lr={raw}", method="demo")
    assert parse_options(Options, "lr=0.5", method="demo").lr == 0.5


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--learning_rate", "inf"], "learning_rate=inf"),
        (["--max_length", "1"], "--max_length >= 2"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--method", "merge", "--method_options", "nosuch=1"], "--method_options for 'merge': bad item 'nosuch=1'"),
        # the paper's default K = 32 on a pool of two rank-4 adapters (8 experts per matrix)
        ([], "--topk_experts 32 exceeds the pool's expert count: matrix 'model.layers.0.self_attn.q_proj' has 8"),
        (["--topk_experts", "9"], "use --topk_experts <= 8"),
    ],
)
def test_run_refuses_them_in_one_line_before_flower_starts(run_assets, tmp_path, flags, needle):
    args = ["run", "--model_name_or_path", run_assets["model"], "--lora_pool", run_assets["pool"], "--num_train", "8"]
    result = CliRunner().invoke(app, [*args, "--output_dir", str(tmp_path / "run"), *flags])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert not (tmp_path / "run").exists()  # nothing written: Flower never started
