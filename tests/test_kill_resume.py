"""Crash safety: SIGKILL the server at several moments, resume, and get exactly the uninterrupted run.

Two ways to die: fail points (``SMARTFED_FAILPOINT``) kill the server process at an
exact phase of a round (LocalGrid transport, in a subprocess); and a plain SIGKILL of
``smartfed run`` (Flower's simulation engine, Ray included) at whatever moment it is in
when round 2's checkpoint appears. Each time ``--resume`` must finish the run with
metrics.jsonl holding rounds 1..N once each, and a final router equal, bit for bit, to
an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smartfed.fl.server_app import FAILPOINT_ENV

from .test_faults import _run, assets, make_config  # noqa: F401 (assets is a fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
# Bit-for-bit equality needs the same torch thread count everywhere: Ray gives each
# simulated client 1, the in-process and subprocess runs would otherwise use the default.
THREADS = 1
SERVER = """
import json, sys
from smartfed.fl.client_app import make_client_app
from smartfed.run.config import RunConfig
from smartfed.fl.server_app import run_server
from tests.local_grid import LocalGrid
config = RunConfig.from_dict(json.loads(sys.argv[1]))
run_server(LocalGrid(make_client_app(config), config.num_clients), config, resume=sys.argv[2] == "1", progress=False)
"""


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **extra}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(out: Path, reference: Path) -> None:
    rows, ref = _rows(out), _rows(reference)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), [r["round"] for r in rows]
    for row, expected in zip(rows, ref, strict=True):  # every redone round is the round that was lost
        assert (row["clients"], row["train_loss"], row["quotas"]) == (
            expected["clients"],
            expected["train_loss"],
            expected["quotas"],
        )
    last = f"checkpoints/round_{ROUNDS:04d}.safetensors"
    got, want = load_file(out / last), load_file(reference / last)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert json.loads((out / "summary.json").read_text())["rounds"] == ROUNDS


def _config(assets, out: Path):  # noqa: F811
    return make_config(assets, out, num_rounds=ROUNDS, eval_every=2, client_threads=THREADS)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("kill") / "reference"
    threads = torch.get_num_threads()
    try:
        _run(_config(assets, out))  # in this process: the client app sets torch's threads to THREADS
    finally:
        torch.set_num_threads(threads)
    return out


def test_failpoints_kill_and_resume(assets, reference, tmp_path):  # noqa: F811
    """Killed after round 1's checkpoint, mid-round 2 (replies in hand), and between round 3's metrics and checkpoint."""
    config = _config(assets, tmp_path / "run")
    payload = json.dumps(asdict(config))
    for resume, failpoint in [("0", "checkpoint:1"), ("1", "replied:2"), ("1", "metrics:3"), ("1", "")]:
        proc = subprocess.run(
            [sys.executable, "-c", SERVER, payload, resume],
            env=_env(**{FAILPOINT_ENV: failpoint}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        expected = -signal.SIGKILL if failpoint else 0
        assert proc.returncode == expected, (failpoint, proc.returncode, proc.stderr[-3000:])
        if failpoint == "metrics:3":  # the line of round 3 is written, its checkpoint is not
            assert [r["round"] for r in _rows(Path(config.output_dir))] == [1, 2, 3]
            assert not (Path(config.output_dir) / "checkpoints" / "round_0003.safetensors").exists()
    _assert_same_run(Path(config.output_dir), reference)


def _tagged(tag: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SMARTFED_TEST_TAG") == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_sigkill_smartfed_run_and_resume(assets, reference, tmp_path):  # noqa: F811
    """A real `smartfed run` (simulation engine) killed with SIGKILL, process group and all, then `--resume`d."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    config = _config(assets, out)
    flags = []
    for key in ("model_name_or_path", "lora_pool", "num_clients", "sample_clients", "num_rounds", "local_steps"):
        flags += [f"--{key}", str(getattr(config, key))]
    for key in ("batch_size", "learning_rate", "topk_experts", "num_train", "num_test", "max_length", "client_threads"):
        flags += [f"--{key}", str(getattr(config, key))]
    flags += ["--max_new_tokens", "2", "--eval_every", "2", "--energy", "none", "--seed", "7", "--enable_eeqa"]
    flags += ["--output_dir", str(out)]
    tag = uuid.uuid4().hex
    cli = [sys.executable, "-m", "smartfed.cli", "run"]
    proc = subprocess.Popen(
        [*cli, *flags],
        env=_env(SMARTFED_TEST_TAG=tag),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 150
    try:
        while not (out / "checkpoints" / "round_0002.safetensors").exists():
            assert proc.poll() is None, f"smartfed run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and everything in its session
        proc.wait(timeout=30)
    for left in _tagged(tag):  # Ray daemons outside the session, if any: ours, so stop them
        left.kill()
    psutil.wait_procs(_tagged(tag), timeout=10)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([*cli, "--resume", str(out)], env=_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, reference)
