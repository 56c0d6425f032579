"""Bad input everywhere a user types or points: fuzzed loaders and the CLI's one-line errors.

Hypothesis feeds the config loader (``RunConfig.from_dict`` / ``from_file``), the adapter
loader (``LoraPool.load``) and the JSONL task loader arbitrary values and bytes: each
either accepts the input or raises ``ValueError``/``OSError`` with a message, never
another exception (which the CLI would show as a traceback). The CLI tests check the
promise end to end: one ``error:`` line naming the bad thing, exit code 2, no traceback
unless ``--debug``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from smartfed.cli import app
from smartfed.data import load_task
from smartfed.more import LoraPool
from smartfed.run.config import RunConfig

from .conftest import save_tiny_assets

FIELDS = [f.name for f in fields(RunConfig)]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from([f.replace("_", "-") for f in FIELDS]), st.text(max_size=10))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_config_loader_accepts_or_names_the_problem(data):
    try:
        config = RunConfig.from_dict(data)
    except ValueError as err:
        assert str(err)
        return
    # accepted: every numeric field is a real number of its declared type
    for f in fields(RunConfig):
        value = getattr(config, f.name)
        assert type(value) is type(f.default), (f.name, value)
        if isinstance(value, float):
            assert not math.isnan(value), f.name


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([".toml", ".yaml", ".json", ".ini"]))
def test_config_files_of_any_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"config{suffix}"
        path.write_bytes(data)
        try:
            RunConfig.from_dict(RunConfig.from_file(path))
        except (ValueError, OSError) as err:
            assert str(err)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-assets")
    model_dir, a, b = save_tiny_assets(root)
    return {"root": root, "model": model_dir, "adapter": a, "other": b}


ADAPTER_FIELDS = [
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "peft_type",
    "base_model_name_or_path",
    "fan_in_fan_out",
]


@FUZZ
@given(
    st.dictionaries(st.sampled_from(ADAPTER_FIELDS), VALUES, max_size=4),
    st.sampled_from(["keep", "truncate", "garbage", "missing", "empty"]),
)
def test_adapter_loader_accepts_or_names_the_problem(assets, changes, weights):
    """A real adapter with fuzzed config fields and damaged weights."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(assets["adapter"], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        file = folder / "adapter_model.safetensors"
        if weights == "truncate":
            file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
        elif weights == "garbage":
            file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
        elif weights == "missing":
            file.unlink()
        elif weights == "empty":
            file.write_bytes(b"")
        try:
            LoraPool.load(str(folder))
        except (ValueError, OSError) as err:
            assert str(err)


@FUZZ
@given(st.binary(max_size=300))
def test_adapter_config_of_any_bytes(assets, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(assets["adapter"], folder)
        (folder / "adapter_config.json").write_bytes(data)
        with pytest.raises((ValueError, OSError)):
            LoraPool.load(str(folder))


@FUZZ
@given(
    st.lists(st.one_of(st.binary(max_size=40), st.dictionaries(st.text(max_size=8), SCALARS, max_size=3)), max_size=5)
)
def test_jsonl_task_loader_accepts_or_names_the_problem(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines))
        try:
            load_task(str(path), seed=0, num_train=4, num_test=2)
        except (ValueError, OSError) as err:
            assert str(err)


# --- the CLI: one line, exit 2, no traceback --------------------------------------------------------
# name -> (extra `smartfed run` arguments, text the error line must contain); {bad}: the bad-files folder
BAD_INPUTS = {
    "unknown config key": (["--config", "{bad}/unknown.toml"], "num_roundz"),
    "config value of the wrong type": (["--config", "{bad}/badtype.toml"], "learning_rate='fast'"),
    "config file not UTF-8": (["--config", "{bad}/latin.toml"], "latin.toml"),
    "config file not TOML": (["--config", "{bad}/notoml.toml"], "notoml.toml"),
    "config file missing": (["--config", "{bad}/nope.toml"], "nope.toml"),
    "bad flag value": (["--aggregation", "mode"], "aggregation='mode'"),
    "bad flag combination": (["--dp", "server", "--aggregation", "median"], "dp='server'"),
    "adapter folder missing": (["--lora_pool", "{bad}/nope"], "nope"),
    "adapter folder empty": (["--lora_pool", "{bad}/emptydir"], "adapter_config.json"),
    "adapter config not JSON": (["--lora_pool", "{bad}/brokenadapter"], "brokenadapter"),
    "model path missing": (["--model_name_or_path", "{bad}/nomodel"], "nomodel"),
    "model folder without config": (["--model_name_or_path", "{bad}/noconfig"], "no config.json"),
    "model path a text file": (["--model_name_or_path", "{bad}/notes.txt"], "notes.txt"),
    "GGUF that is not a model": (["--model_name_or_path", "{bad}/fake.gguf"], "not a GGUF file"),
    "dataset missing a field": (["--task", "{bad}/missing.jsonl"], "no 'output' field"),
    "dataset empty": (["--task", "{bad}/empty.jsonl"], "empty.jsonl"),
    "dataset not UTF-8": (["--task", "{bad}/latin.jsonl"], "not valid UTF-8"),
    "resume folder that is not a run": (["--resume", "{bad}/emptydir"], "not a SmartFed run folder"),
    "resume folder with a damaged metrics.jsonl": (["--resume", "{bad}/run_metrics"], "not a SmartFed metrics file"),
    "resume folder with a damaged checkpoint": (["--resume", "{bad}/run_checkpoint"], "cannot read it"),
}


def _write_bad_files(root: Path, model: Path, pool: str) -> Path:
    """The bad files and folders BAD_INPUTS points at, under root/bad."""
    (root / "bad").mkdir(exist_ok=True)
    bad = root / "bad"
    files = {
        "unknown.toml": b"num_roundz = 3\n",
        "badtype.toml": b'learning_rate = "fast"\n',
        "latin.toml": b"task = '\xff'\n",
        "notoml.toml": b"[[[",
        "missing.jsonl": b'{"instruction": "2+2"}\n',
        "empty.jsonl": b"",
        "latin.jsonl": b'{"instruction": "\xff", "output": "4"}\n',
        "fake.gguf": b"GARBAGE, NOT A MODEL",
        "notes.txt": b"hello",
    }
    for name, data in files.items():
        (bad / name).write_bytes(data)
    (bad / "emptydir").mkdir(exist_ok=True)
    (bad / "noconfig").mkdir(exist_ok=True)
    (bad / "brokenadapter").mkdir(exist_ok=True)
    (bad / "brokenadapter" / "adapter_config.json").write_text("{not json")
    # topk_experts=4: a run the pool can serve (8 experts per matrix), so only the damage is wrong
    run_config = RunConfig(model_name_or_path=str(model), lora_pool=pool, energy="none", topk_experts=4)
    config = json.dumps(run_config.to_dict())
    for run, damage in [("run_metrics", "metrics.jsonl"), ("run_checkpoint", "checkpoints/round_0001.safetensors")]:
        (bad / run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (bad / run / "config.json").write_text(config)
        (bad / run / "metrics.jsonl").write_text('{"round": 1}\n')
        (bad / run / damage).write_bytes(b'{"round": 1, "train_lo')  # what a torn write would leave
    return bad


@pytest.fixture(scope="module")
def bad_inputs(assets) -> dict[str, tuple[list[str], str]]:
    bad = _write_bad_files(assets["root"], assets["model"], f"{assets['adapter']},{assets['other']}")
    return {name: ([a.format(bad=bad) for a in args], needle) for name, (args, needle) in BAD_INPUTS.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_line_exit_2(assets, bad_inputs, case):
    extra, needle = bad_inputs[case]
    base = [
        "run",
        "--model_name_or_path",
        str(assets["model"]),
        "--lora_pool",
        f"{assets['adapter']},{assets['other']}",
    ]
    result = CliRunner().invoke(app, base + extra)
    assert result.exit_code == 2, (case, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output


def test_debug_shows_the_exception(assets, bad_inputs):
    extra, _ = bad_inputs["dataset empty"]
    base = ["run", "--model_name_or_path", str(assets["model"]), "--lora_pool", str(assets["adapter"]), "--debug"]
    result = CliRunner().invoke(app, base + extra)
    assert result.exit_code != 2 and isinstance(result.exception, ValueError)
