"""A federation with fewer nodes than clients fails within a bounded time, naming the setting; `flwr run .` end to end.

The unit tests drive ``SmartFedStrategy.discover`` on stub grids (no Flower engine). The
``slow`` tests run the documented ``flwr run .`` on Flower's local simulation (a managed
local SuperLink started by ``flwr`` on private ports under a private ``FLWR_HOME``, killed
afterwards) with the tiny model: once with Flower's default federation of 2 SuperNodes
(too few for pyproject's ``num-clients = 20``: it must fail fast, not wait in silence), once
with the README's ``--federation-config "num-supernodes=20"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from smartfed.fl.strategy import NODE_STALL_ENV, SmartFedStrategy, node_stall_seconds

from .conftest import save_tiny_assets, tiny_run_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest provides flwr and flower-superlink


class _Nodes:
    """A grid stub whose connected nodes follow ``schedule``: (seconds after start, node count) steps."""

    def __init__(self, schedule: list[tuple[float, int]]) -> None:
        self.schedule = schedule
        self.start = time.monotonic()

    def get_node_ids(self) -> Iterable[int]:
        elapsed = time.monotonic() - self.start
        count = max(n for t, n in self.schedule if t <= elapsed)
        return list(range(100, 100 + count))


def _strategy(num_clients: int) -> SmartFedStrategy:
    return SmartFedStrategy(num_clients=num_clients, sample_clients=2, seed=0)


def test_too_few_nodes_fail_within_the_stall_time_naming_the_settings() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        _strategy(20).discover(_Nodes([(0, 2)]), stall_seconds=0.6, poll_seconds=0.05)  # type: ignore[arg-type]
    elapsed = time.monotonic() - start
    assert 0.6 <= elapsed < 3, elapsed
    message = str(info.value)
    assert "\n" not in message and message.startswith("only 2 of num-clients=20 nodes connected")
    assert '--federation-config "num-supernodes=20"' in message and '--run-config "num-clients=2"' in message
    assert NODE_STALL_ENV in message


def test_nodes_still_joining_restart_the_wait() -> None:
    start = time.monotonic()
    grid = _Nodes([(0, 0), (0.4, 1), (0.8, 2), (1.2, 3)])  # a node every 0.4 s, stall window 0.6 s
    with pytest.raises(TimeoutError, match="only 3 of num-clients=4"):
        _strategy(4).discover(grid, stall_seconds=0.6, poll_seconds=0.05)  # type: ignore[arg-type]
    assert time.monotonic() - start >= 1.2 + 0.6


def test_the_whole_wait_is_bounded_even_while_nodes_trickle_in() -> None:
    grid = _Nodes([(0.2 * i, i) for i in range(50)])  # never stalls, never reaches 60
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="of num-clients=60"):
        _strategy(60).discover(grid, wait_seconds=1.0, stall_seconds=5.0, poll_seconds=0.05)  # type: ignore[arg-type]
    assert 1.0 <= time.monotonic() - start < 3


def test_the_stall_time_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NODE_STALL_ENV, "0.3")
    assert node_stall_seconds() == 0.3
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        _strategy(3).discover(_Nodes([(0, 1)]), poll_seconds=0.05)  # type: ignore[arg-type]
    assert time.monotonic() - start < 2
    for bad in ("x", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(NODE_STALL_ENV, bad)
        with pytest.raises(ValueError, match=f"{NODE_STALL_ENV}=.* must be a positive number of seconds"):
            node_stall_seconds()


def test_a_federation_too_small_for_the_run_writes_nothing(
    run_assets: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smartfed.fl.client_app import make_client_app
    from smartfed.fl.server_app import run_server

    from .local_grid import LocalGrid

    monkeypatch.setenv(NODE_STALL_ENV, "0.5")
    out = tmp_path / "run"
    config = tiny_run_config(run_assets, out, "smartfed", num_clients=3, topk_experts=4)
    with pytest.raises(TimeoutError, match="only 2 of num-clients=3"):
        run_server(LocalGrid(make_client_app(config), 2), config, progress=False)
    assert not out.exists()


# --- `flwr run .` on Flower's local simulation -------------------------------------------------------

FLWR_TAG_ENV = "SMARTFED_FLWR_TEST_TAG"
RUN_TIMEOUT = 300  # one run takes ~50 s on an idle 2-core machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_tagged(tag: str) -> None:
    """Kill every live process that carries ``tag`` in its environment (the detached local SuperLink & co.)."""
    psutil = pytest.importorskip("psutil")
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if proc.environ().get(FLWR_TAG_ENV) == tag:
                proc.kill()


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a `flwr` whose managed local SuperLink is this module's own (private home, ports, tag)."""
    if not (BIN / "flwr").exists() or not (BIN / "flower-superlink").exists():
        pytest.skip("flwr / flower-superlink are not installed in this environment")
    pytest.importorskip("psutil")
    tag = uuid.uuid4().hex
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path_factory.mktemp("flwr-home")),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else flwr tries to pip-install the app
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        FLWR_TAG_ENV: tag,
    }
    try:
        yield env
    finally:
        _kill_tagged(tag)


@pytest.fixture(scope="module")
def flwr_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    model_dir, a, b = save_tiny_assets(tmp_path_factory.mktemp("flwr-assets"))
    return {"model": str(model_dir), "pool": f"{a},{b}"}


def _flwr_run(env: dict[str, str], assets: dict[str, str], out: Path, *extra: str) -> tuple[str, float]:
    """`flwr run . --stream` with pyproject's run config but a tiny model and one short round; (output, seconds)."""
    overrides = (
        f'model-name-or-path="{assets["model"]}" lora-pool="{assets["pool"]}" num-rounds=1 local-steps=1 '
        f'batch-size=4 topk-experts=4 num-train=40 num-test=2 max-length=32 max-new-tokens=2 energy="none" '
        f'output-dir="{out}"'
    )
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "flwr"), "run", ".", "--stream", *extra, "--run-config", overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return proc.stdout + proc.stderr, time.monotonic() - started


@pytest.mark.slow
def test_flwr_run_with_flowers_default_federation_fails_fast_naming_num_supernodes(
    flwr_env: dict[str, str], flwr_assets: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    output, seconds = _flwr_run({**flwr_env, NODE_STALL_ENV: "10"}, flwr_assets, out)
    # pyproject's num-clients = 20, Flower's local simulation: 2 SuperNodes
    assert "only 2 of num-clients=20 nodes connected" in output, output[-4000:]
    assert '--federation-config "num-supernodes=20"' in output
    assert seconds < 200, seconds  # the engine's start-up plus the 10 s stall window, not forever
    assert not out.exists()


@pytest.mark.slow
def test_flwr_run_with_pyprojects_defaults_as_the_readme_says(
    flwr_env: dict[str, str], flwr_assets: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    output, _ = _flwr_run(flwr_env, flwr_assets, out, "--federation-config", "num-supernodes=20")
    assert (out / "summary.json").is_file(), output[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["clients_replied"] == 2 and not rows[0]["skipped"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["num_clients"] == 20 and summary["config"]["sample_clients"] == 2
