"""The command line: the demo runs and composes, `pool inspect` reports and refuses bad input."""

from __future__ import annotations

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
