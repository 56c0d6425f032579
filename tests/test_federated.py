"""End to end on Flower's simulation engine: 4 clients, 3 rounds, tiny Llama, two tiny adapters."""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from smartfed.cli import app
from smartfed.fl.simulation import run_simulation
from smartfed.run.config import RunConfig

from .conftest import save_tiny_assets

ROW_FIELDS = {
    "round",
    "clients",
    "clients_replied",
    "train_loss",
    "eval_metric",
    "eval_score",
    "eval_n",
    "bytes_up",
    "bytes_up_per_client",
    "bytes_up_state",
    "bytes_up_extras",
    "bytes_down",
    "bytes_down_per_client",
    "wire_dtype",
    "train_seconds",
    "train_kwh",
    "eval_seconds",
    "eval_kwh",
    "wall_seconds",
    "energy_kwh",
    "energy_method",
    "quotas",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama saved as a transformers folder (with a char tokenizer) and two PEFT adapters for it."""
    root = tmp_path_factory.mktemp("assets")
    model_dir, a, b = save_tiny_assets(root)
    return {"model": str(model_dir), "pool": f"{a},{b}", "root": str(root)}


def _config(assets, output_dir: Path, **overrides) -> RunConfig:
    values = dict(
        model_name_or_path=assets["model"],
        lora_pool=assets["pool"],
        task="arith",
        num_clients=4,
        sample_clients=2,
        num_rounds=3,
        local_steps=6,
        batch_size=8,
        learning_rate=5e-2,
        topk_experts=4,
        enable_eeqa=True,
        num_train=128,
        num_test=16,
        max_length=32,
        max_new_tokens=4,
        energy="none",
        seed=7,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return RunConfig(**values)


# What Ray did during ``full_run``: the inet addresses its processes listened on, and its temp folders.
_RAY_SEEN: dict[str, set[str]] = {"listening": set(), "temp_before": set(), "temp_during": set(), "temp_after": set()}


def _ray_temp_folders(tmp: Path) -> set[str]:
    return {p.name for p in tmp.glob("smartfed-ray-*")} | {p.name for p in (tmp / "ray").glob("session_*")}


def _watch_listeners(stop: threading.Event, tmp: Path) -> None:
    """Poll the listening TCP sockets of this process's descendants (Ray's GCS, raylet, workers), and Ray's
    temp folders under ``tmp`` while the run lasts."""
    import psutil

    me = psutil.Process()
    while not stop.wait(0.2):
        _RAY_SEEN["temp_during"] |= _ray_temp_folders(tmp)
        for child in me.children(recursive=True):
            try:
                for conn in child.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        _RAY_SEEN["listening"].add(conn.laddr.ip)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    # A temp root of this run's own (short: Ray's socket paths must stay under 107 bytes), so another
    # smartfed run on the machine cannot add or remove folders where the check looks.
    with tempfile.TemporaryDirectory(prefix="sf-") as own_tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", own_tmp)
        _RAY_SEEN["temp_before"] = _ray_temp_folders(Path(own_tmp))
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_listeners, args=(stop, Path(own_tmp)), daemon=True)
        watcher.start()
        try:
            run_simulation(_config(assets, out), progress=False)
        finally:
            stop.set()
            watcher.join()
        _RAY_SEEN["temp_after"] = _ray_temp_folders(Path(own_tmp))
    return out


def test_ray_listens_on_loopback_only_and_leaves_no_temp_folder(full_run):
    """Ray under the simulation engine binds 127.0.0.1 only, and its session folder goes with the run."""
    assert _RAY_SEEN["listening"], "no listening socket of Ray was seen: the watcher observed nothing"

    def loopback(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)

    assert all(loopback(a) for a in _RAY_SEEN["listening"]), _RAY_SEEN["listening"]
    assert _RAY_SEEN["temp_during"] - _RAY_SEEN["temp_before"], "the run made no Ray temp folder where it was watched"
    assert _RAY_SEEN["temp_after"] <= _RAY_SEEN["temp_before"], _RAY_SEEN["temp_after"] - _RAY_SEEN["temp_before"]


def test_federated_run_writes_every_field(full_run, assets):
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) >= ROW_FIELDS, ROW_FIELDS - set(row)
        assert row["clients_replied"] == 2 and len(row["clients"]) == 2
        # training and the server's evaluation are timed apart; the round is both
        assert row["train_seconds"] > 0 and row["eval_seconds"] > 0
        assert row["wall_seconds"] == pytest.approx(row["train_seconds"] + row["eval_seconds"], abs=0.05)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    router = load_file(full_run / "checkpoints" / "round_0003.safetensors")
    router_bytes = sum(v.numel() * v.element_size() for k, v in router.items() if ".router." in k)
    for row in rows:
        assert row["bytes_up_state"] == router_bytes * 2  # the router, from each sampled client
        assert row["bytes_up"] == row["bytes_up_state"] + row["bytes_up_extras"]
    # 4 matrices (q, v in 2 layers), 8 experts each, K = 4: the budget is 16 and EEQA keeps it
    for row in rows:
        assert sum(row["quotas"].values()) == 16
        # the logged gap is the distance of the logged quotas to the exact optimum, found here by brute force over
        # the 8^4 quota vectors on the importance the server allocated with (its checkpoint keeps it as an extra)
        saved = load_file(full_run / "checkpoints" / f"round_{row['round']:04d}.safetensors")
        imp = {
            k.removeprefix("importance."): sorted(v.tolist(), reverse=True)
            for k, v in saved.items()
            if k.startswith("importance.")
        }
        assert set(imp) == set(row["quotas"])
        best = max(
            math.fsum(math.fsum(imp[n][:k]) for n, k in zip(imp, ks, strict=True))
            for ks in itertools.product(range(1, 9), repeat=len(imp))
            if sum(ks) == 16
        )
        logged = math.fsum(math.fsum(imp[n][:k]) for n, k in row["quotas"].items())
        assert row["eeqa_gap"] == pytest.approx(best - logged, rel=1e-6, abs=1e-6 * best)
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    assert summary["status"] == "completed" and summary["reason"] is None
    assert summary["bytes_total"] == summary["bytes_up_total"] + summary["bytes_down_total"]
    assert summary["train_seconds_total"] == pytest.approx(sum(r["train_seconds"] for r in rows))
    config = json.loads((full_run / "config.json").read_text())
    assert config["num_clients"] == 4 and config["lora_pool"] == assets["pool"]


def test_resume_gives_the_same_final_router(full_run, assets, tmp_path):
    out = tmp_path / "resumed"
    run_simulation(_config(assets, out, num_rounds=2), progress=False)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    result = CliRunner().invoke(app, ["run", "--resume", str(out), "--num_rounds", "3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    resumed = load_file(out / "checkpoints" / "round_0003.safetensors")
    uninterrupted = load_file(full_run / "checkpoints" / "round_0003.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)


def test_run_help_lists_the_reference_flags():
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in (
        "--model_name_or_path",
        "--lora_pool",
        "--task",
        "--num_clients",
        "--sample_clients",
        "--num_rounds",
        "--local_steps",
        "--batch_size",
        "--learning_rate",
        "--topk_experts",
        "--enable_eeqa",
        "--output_dir",
        "--seed",
        "--partition",
        "--alpha",
        "--config",
        "--resume",
    ):
        assert flag in result.output, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_rounds", "0"], "num_rounds=0"),
        (["--partition", "zipf"], "partition='zipf'"),
        (["--lora_pool", "/no/such/adapter"], "/no/such/adapter"),
        (["--model_name_or_path", "/no/such/model"], "/no/such/model"),
    ],
)
def test_bad_flags_give_one_line_errors(assets, args, message):
    base = ["run", "--model_name_or_path", assets["model"], "--lora_pool", assets["pool"]]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_config_file_and_unknown_key(assets, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("num_roundz = 3\n")
    result = CliRunner().invoke(
        app, ["run", "--config", str(bad), "--model_name_or_path", assets["model"], "--lora_pool", assets["pool"]]
    )
    assert result.exit_code == 2 and "num_roundz" in result.output
