"""The command line's pieces: options from config dataclasses, the command list, eval's folder names."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import pytest
import typer
from typer.testing import CliRunner

from smartfed.cli import app, pool_app, zoo_app
from smartfed.cli.options import add_dataclass_options, dataclass_options
from smartfed.run.config import RunConfig
from smartfed.serving.evaluate import task_folder_name


@dataclass
class _Config:
    name: str = field(default="x", metadata={"help": "A name."})
    steps: int = field(default=3, metadata={"help": "Steps."})
    rate: float = 0.5
    fast: bool = False


def test_dataclass_options_take_the_field_defaults_and_help() -> None:
    params = {p.name: p for p in dataclass_options(_Config)}
    assert list(params) == ["name", "steps", "rate", "fast"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert params["steps"].annotation is int and params["steps"].default.default == 3
    assert params["name"].default.param_decls == ("--name",) and params["name"].default.help == "A name."
    assert params["rate"].default.help == ""  # no metadata: an empty help


def test_override_options_default_to_none_and_pair_the_bools() -> None:
    params = {p.name: p for p in dataclass_options(_Config, overrides=True, exclude=("rate",))}
    assert list(params) == ["name", "steps", "fast"]
    assert all(p.default.default is None and p.default.show_default is False for p in params.values())
    assert params["steps"].annotation == Optional[int]
    assert params["fast"].default.param_decls == ("--fast/--no_fast",)
    with pytest.raises(TypeError, match="not a dataclass"):
        dataclass_options(int)


def test_add_dataclass_options_replaces_the_var_keyword() -> None:
    def command(debug: bool = False, **values: Any) -> dict[str, Any]:
        return values

    assert add_dataclass_options(command, _Config) is command
    assert list(inspect.signature(command).parameters) == ["debug", "name", "steps", "rate", "fast"]

    def closed(debug: bool = False) -> None:
        pass

    with pytest.raises(TypeError, match="no \\*\\*values"):
        add_dataclass_options(closed, _Config)

    app_ = typer.Typer()
    app_.command("go")(command)
    app_.command("other")(lambda: None)
    result = CliRunner().invoke(app_, ["go", "--steps", "7", "--fast"])
    assert result.exit_code == 0, result.output


def test_run_and_compare_take_every_run_config_field() -> None:
    options = {
        cmd.name: {p.name for p in typer.main.get_command(app).commands[cmd.name].params}  # type: ignore[attr-defined]
        for cmd in app.registered_commands
    }
    names = {f.name for f in fields(RunConfig)}
    assert names <= options["run"]
    assert names - {"method"} <= options["compare"] and "method" not in options["compare"]


def test_commands_keep_their_order() -> None:
    assert [c.name for c in app.registered_commands] == [
        "run",
        "demo",
        "methods",
        "compare",
        "report",
        "generate",
        "eval",
        "export",
    ]
    assert [c.name for c in pool_app.registered_commands] == ["inspect"]
    assert [c.name for c in zoo_app.registered_commands] == ["build", "list"]


@pytest.mark.parametrize(
    ("task", "folder"),
    [
        ("arith", "arith"),
        ("gsm8k:/data/gsm8k", "gsm8k"),
        ("mgsm.es:/data/mgsm", "mgsm.es"),
        ("path/to/my file.jsonl", "my_file"),
    ],
)
def test_eval_folder_names(task: str, folder: str) -> None:
    assert task_folder_name(task) == folder
