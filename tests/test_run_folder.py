"""A run folder holds one run: fresh runs refuse used folders, resumes refuse other settings, a lock, checksums.

Federations here run on LocalGrid (``run_in_process``, no Ray); the CLI tests stop before
Flower starts, except the one `--overwrite` run marked slow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from smartfed.cli import app
from smartfed.fl.client_app import make_client_app
from smartfed.fl.server_app import run_server
from smartfed.methods import get_method_class, load_builtin_methods
from smartfed.more import LoraPool
from smartfed.run.folder import (
    CHECKSUM_KEY,
    LOCK_FILE,
    PAYLOAD_KEY,
    RunFolder,
    RunFolderBusy,
    enclosing_run_folder,
    is_run_folder,
)

from .conftest import run_in_process, tiny_run_config
from .local_grid import LocalGrid

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def _run_flags(assets: dict[str, str], out: Path, *extra: str) -> list[str]:
    config = tiny_run_config(assets, out, "smartfed", topk_experts=4)
    flags = ["run"]
    for key in ("model_name_or_path", "lora_pool", "num_clients", "sample_clients", "num_rounds", "local_steps"):
        flags += [f"--{key}", str(getattr(config, key))]
    for key in ("batch_size", "learning_rate", "topk_experts", "num_train", "num_test", "max_length", "seed"):
        flags += [f"--{key}", str(getattr(config, key))]
    return [*flags, "--max_new_tokens", "2", "--energy", "none", "--output_dir", str(out), *extra]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (dot files included) with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(run_assets, tmp_path_factory) -> Path:
    """A finished 2-round SmartFed run (LocalGrid), never modified by the tests (they copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_in_process(tiny_run_config(run_assets, out, "smartfed", topk_experts=4))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


# --- §1 a fresh run never overwrites or mixes --------------------------------------------------------
def test_a_fresh_run_refuses_a_folder_holding_a_run(run_assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    code, lines = _cli(*_run_flags(run_assets, run))
    assert code == 2 and len(lines) == 1, lines
    assert str(run) in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert _snapshot(run) == before  # nothing written, not even a lock file
    with pytest.raises(FileExistsError, match="holds a SmartFed run"):  # the Python API too
        run_in_process(tiny_run_config(run_assets, run, "smartfed", topk_experts=4))
    assert _snapshot(run) == before


def test_the_models_folder_is_refused_as_output_dir_even_with_overwrite(run_assets):
    model = Path(run_assets["model"])
    before = _snapshot(model)
    code, lines = _cli(*_run_flags(run_assets, model))
    assert code == 2 and len(lines) == 1 and "not a SmartFed run folder" in lines[0], lines
    code, lines = _cli(*_run_flags(run_assets, model, "--overwrite"))
    assert code == 2 and len(lines) == 1, lines
    assert "--overwrite" in lines[0] and "refusing to delete it" in lines[0] and str(model) in lines[0]
    assert _snapshot(model) == before and not is_run_folder(model)


def test_overwrite_deletes_the_old_run_before_the_new_one_starts(run_assets, finished, tmp_path):
    """The old run's checkpoints never survive into the new run (the issue: eval scored an old checkpoint)."""
    run = _copy(finished, tmp_path)
    stale = RunFolder(run).checkpoint_path(7)
    shutil.copy(RunFolder(run).checkpoint_path(2), stale)
    (run / "eval").mkdir()
    (run / "eval" / "scores.json").write_text("{}")
    config = tiny_run_config(run_assets, run, "smartfed", topk_experts=4, num_rounds=1, seed=11)
    folder = RunFolder(run)
    with folder.open_run(config, resume=False, overwrite=True):  # what run_simulation does around Flower
        assert [p.name for p in folder.entries()] == []
        run_in_process(config)  # run_server re-enters the lock and finds the folder empty
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round_0001.safetensors"]
    assert not (run / "eval").exists()
    assert json.loads((run / "config.json").read_text())["seed"] == 11
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_overwrite_never_deletes_what_the_run_reads(run_assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.copytree(run_assets["model"], run / "model")
    config = tiny_run_config(run_assets, run, "smartfed", model_name_or_path=str(run / "model"))
    with pytest.raises(ValueError, match="lies inside"):
        RunFolder(run).check_run(config, resume=False, overwrite=True)
    assert (run / "model" / "config.json").is_file()


@pytest.mark.slow
def test_cli_overwrite_replaces_a_finished_run(run_assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.copy(RunFolder(run).checkpoint_path(2), RunFolder(run).checkpoint_path(9))
    flags = _run_flags(run_assets, run, "--overwrite")
    flags[flags.index("--num_rounds") + 1] = "1"
    code, lines = _cli(*flags)
    assert code == 0, lines
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round_0001.safetensors"]


# --- §1 the lock: one live run per folder --------------------------------------------------------------
HOLDER = """
import sys, time
from smartfed.run.folder import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A run folder whose lock another process holds; yields (folder, that process)."""
    folder = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_second_run_on_a_locked_folder_is_refused(run_assets, held):
    folder, proc = held
    with pytest.raises(RunFolderBusy, match=f"pid {proc.pid}"), RunFolder(folder).lock():
        pass
    code, lines = _cli(*_run_flags(run_assets, folder))
    assert code == 2 and len(lines) == 1, lines
    assert str(folder) in lines[0] and "in use by another SmartFed run" in lines[0]
    assert [p.name for p in folder.iterdir()] == [LOCK_FILE]  # the refused run wrote nothing
    proc.kill()  # the kernel drops a dead holder's lock, even after SIGKILL
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            with RunFolder(folder).lock():
                break
        except RunFolderBusy:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_resume_on_a_locked_folder_is_refused(run_assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        code, lines = _cli("run", "--resume", str(run), "--num_rounds", "3")
        assert code == 2 and len(lines) == 1 and "in use by another SmartFed run" in lines[0], lines
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    folder = RunFolder(tmp_path / "r")
    with folder.lock(), folder.lock():  # the CLI, run_simulation and run_server nest it
        assert (tmp_path / "r" / LOCK_FILE).read_text().strip() == str(os.getpid())


# --- §2 a resume continues the same run or refuses ----------------------------------------------------
def test_resume_with_other_settings_is_refused_and_writes_nothing(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    code, lines = _cli("run", "--resume", str(run), "--learning_rate", "0.5", "--router", "linear", "--num_rounds", "4")
    assert code == 2 and len(lines) == 1, lines
    assert "learning_rate" in lines[0] and "router" in lines[0] and "num_rounds" not in lines[0].split(";")[0]
    assert _snapshot(run) == before


def test_resume_into_another_output_dir_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    code, lines = _cli("run", "--resume", str(run), "--output_dir", str(tmp_path / "elsewhere"))
    assert code == 2 and len(lines) == 1 and "--resume" in lines[0] and "--output_dir" in lines[0], lines
    assert not (tmp_path / "elsewhere").exists()


def test_resume_may_extend_the_run(run_assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    config = tiny_run_config(run_assets, run, "smartfed", topk_experts=4, num_rounds=3, eval_every=2)
    run_server(LocalGrid(make_client_app(config), config.num_clients), config, resume=True, progress=False)
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["num_rounds"] == 3


def test_resume_refuses_to_discard_recorded_rounds_whose_checkpoints_are_gone(run_assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    config = tiny_run_config(run_assets, run, "smartfed", topk_experts=4)
    (run / "checkpoints" / "round_0002.safetensors").unlink()
    RunFolder(run).check_resume(config)  # a crash between round 2's metrics line and its checkpoint: redo round 2
    (run / "checkpoints" / "round_0001.safetensors").unlink()
    before = _snapshot(run)
    code, lines = _cli("run", "--resume", str(run))
    assert code == 2 and len(lines) == 1, lines
    assert "records rounds up to 2" in lines[0] and "round 0" in lines[0] and str(run) in lines[0], lines
    assert _snapshot(run) == before


def test_resume_checks_the_adapters_by_their_weights(run_assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    moved = [Path(shutil.copytree(p, tmp_path / f"moved_{i}")) for i, p in enumerate(run_assets["pool"].split(","))]
    config = tiny_run_config(run_assets, run, "smartfed", topk_experts=4, lora_pool=",".join(map(str, moved)))
    RunFolder(run).check_resume(config)  # the same adapters in other folders: accepted
    weights = moved[1] / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="lora_pool"):  # other folders holding other weights
        RunFolder(run).check_resume(config)
    same_paths = tiny_run_config(run_assets, run, "smartfed", topk_experts=4)
    with pytest.raises(ValueError, match=r"adapter weights differ from pool\.json"):  # as run_server sees a change
        RunFolder(run).check_resume(same_paths, LoraPool.load([str(p) for p in moved]))


def _damage(path: Path) -> None:
    """Zero the last 64 bytes (tensor data; the header is at the start): still a readable safetensors file."""
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_zeroed_bytes_is_refused_on_resume_and_load(finished, tmp_path):
    import smartfed

    run = _copy(finished, tmp_path)
    folder = RunFolder(run)
    path = folder.checkpoint_path(2)
    with safe_open(path, framework="pt") as fh:
        assert len((fh.metadata() or {})[CHECKSUM_KEY]) == 64  # every new checkpoint carries one
    _damage(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        folder.load_checkpoint(2)
    code, lines = _cli("run", "--resume", str(run), "--num_rounds", "3")
    assert code == 2 and len(lines) == 1 and str(path) in lines[0] and "sha256" in lines[0], lines
    with pytest.raises(ValueError, match=re.escape(str(path))):
        smartfed.load(run)


def test_an_old_checkpoint_without_a_checksum_still_loads(tmp_path):
    folder = RunFolder(tmp_path)
    tensors = {"r.w": torch.arange(6.0).reshape(2, 3), "r.b": torch.zeros(2, dtype=torch.bfloat16)}
    path = folder.checkpoint_path(1)
    path.parent.mkdir(parents=True)
    save_file(tensors, path, metadata={"format": "pt", PAYLOAD_KEY: json.dumps({"quotas": {"m": 2}})})
    loaded, payload = folder.load_checkpoint(1)
    assert payload == {"quotas": {"m": 2}} and torch.equal(loaded["r.w"], tensors["r.w"])
    folder.save_checkpoint(2, tensors, {"quotas": {"m": 2}})  # a new one has it, and it verifies
    assert folder.load_checkpoint(2)[1] == {"quotas": {"m": 2}}
    payload_tampered = folder.checkpoint_path(2).read_bytes().replace(b'\\"m\\": 2', b'\\"m\\": 9')
    assert payload_tampered != folder.checkpoint_path(2).read_bytes()
    folder.checkpoint_path(2).write_bytes(payload_tampered)
    with pytest.raises(ValueError, match="sha256"):  # the payload is covered too
        folder.load_checkpoint(2)


# --- --topk_experts above the pool's experts -----------------------------------------------------------
def test_topk_above_the_pools_experts_is_a_one_line_error(run_assets, tmp_path):
    out = tmp_path / "run"
    flags = _run_flags(run_assets, out)
    flags[flags.index("--topk_experts") + 1] = "32"  # the paper's default, on 2 adapters of rank 4
    code, lines = _cli(*flags)
    assert code == 2 and len(lines) == 1, lines
    assert "--topk_experts 32" in lines[0] and "8 rank-one experts" in lines[0] and "Traceback" not in lines[0]
    assert not out.exists()
    load_builtin_methods()
    config = tiny_run_config(run_assets, out, "smartfed", topk_experts=9)
    pool = LoraPool.load(run_assets["pool"].split(","))
    for method in ("smartfed", "a3smoe"):  # the Python API says the same when the model is built
        with pytest.raises(ValueError, match="--topk_experts 9"):
            get_method_class(method)(config).check_pool(pool)


# --- export never writes into a run folder or the model's folder --------------------------------------
@pytest.mark.parametrize("where", ["run", "inside_run", "inside_model", "beside_overwrite"])
def test_export_output_is_refused_in_a_run_or_model_folder(run_assets, finished, tmp_path, where):
    run = _copy(finished, tmp_path)
    output = {
        "run": run,
        "inside_run": run / "exports" / "a",
        "inside_model": Path(run_assets["model"]) / "export",
        "beside_overwrite": tmp_path / "notes",
    }[where]
    if where == "beside_overwrite":  # --overwrite replaces an earlier export, not any folder
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    before = _snapshot(run)
    code, lines = _cli("export", str(run), "--rank", "2", "--output", str(output), "--overwrite", "--no_eval")
    assert code == 2 and len(lines) == 1, lines
    assert "--output" in lines[0] or "--overwrite" in lines[0]
    assert _snapshot(run) == before
    assert not (Path(run_assets["model"]) / "export").exists()
    if where == "beside_overwrite":
        assert (output / "keep.txt").read_text() == "mine"


def test_enclosing_run_folder(finished, tmp_path):
    assert enclosing_run_folder(finished / "checkpoints" / "x") == finished.resolve()
    assert enclosing_run_folder(tmp_path / "nowhere") is None
