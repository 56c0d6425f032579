"""Differential privacy end to end (Flower's fixed-clipping wrappers) and its accounting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load_file

from smartfed.fl import keys
from smartfed.fl.client_app import make_client_app
from smartfed.fl.privacy import KEY_CLIPPING_NORM, _delta_of_epsilon, clip_state, epsilon
from smartfed.methods.aggregation import delta_norm
from smartfed.run.config import RunConfig

from .test_faults import _rows, _run, assets, make_config  # noqa: F401 (assets is a fixture)


def _routers(out: Path, server_round: int) -> dict[str, torch.Tensor]:
    tensors = load_file(out / "checkpoints" / f"round_{server_round:04d}.safetensors")
    return {k: v for k, v in tensors.items() if ".router." in k}


def _initial_router(config: RunConfig) -> dict[str, torch.Tensor]:
    from smartfed.fl.runtime import build_runtime

    runtime = build_runtime(config)
    return {k: v.clone() for k, v in runtime.method.get_state(runtime.model).items()}


# --- accounting ---------------------------------------------------------------------------------------
def test_epsilon_solves_the_gdp_tradeoff_and_composes():
    eps = epsilon([2.0, 2.0, 2.0, 2.0], 1e-5)
    assert _delta_of_epsilon(eps, math.sqrt(4 / 4.0)) == pytest.approx(1e-5, rel=1e-6)
    # k Gaussian releases at z are one release at z/sqrt(k) (Dong et al., 2022, Cor. 3.3)
    assert epsilon([2.0] * 4, 1e-5) == pytest.approx(epsilon([1.0], 1e-5))
    assert epsilon([1.0], 1e-5) < epsilon([1.0, 1.0], 1e-5) < epsilon([0.5, 1.0], 1e-5)
    assert epsilon([0.0], 1e-5) == math.inf and epsilon([], 1e-5) == 0.0
    assert epsilon([1e6], 1e-5) == 0.0  # so much noise that δ(0) < δ


def test_client_side_clip_uses_flowers_rule():
    received = {"a": torch.zeros(3), "b": torch.ones(2)}
    state = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0])}  # delta norm 5
    clipped = clip_state(state, received, 1.0)
    assert delta_norm(clipped, received) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0, 0.0]))
    assert clip_state(received, received, 1.0)["b"] is received["b"]  # zero delta: unchanged, no division by 0


# --- end to end on LocalGrid --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["server", "client"])
def test_clipped_updates_bound_each_round_without_noise(assets, tmp_path, mode):  # noqa: F811
    """z = 0: the global router moves by at most C per round (the mean of deltas clipped to C)."""
    clip = 0.05
    config = make_config(assets, tmp_path / mode, dp=mode, dp_noise_multiplier=0.0, dp_clipping_norm=clip)
    rows = _run(config)
    assert all(r["clients_replied"] == 2 and r["dropped"] == [] for r in rows)
    previous = _initial_router(config)
    for r in (1, 2, 3):
        router = _routers(tmp_path / mode, r)
        moved = delta_norm(router, previous)
        assert 0 < moved <= clip * (1 + 1e-4), (r, moved)
        previous = router
    assert rows[-1]["dp"]["mode"] == mode and rows[-1]["dp"]["epsilon"] is None  # z = 0: no guarantee


def test_server_noise_is_added_to_the_global_update_and_accounted(assets, tmp_path):  # noqa: F811
    config = make_config(assets, tmp_path / "noise", dp="server", dp_noise_multiplier=1.0, dp_clipping_norm=0.05)
    rows = _run(config)
    initial, first = _initial_router(config), _routers(tmp_path / "noise", 1)
    dimension = sum(v.numel() for v in first.values())
    std = 1.0 * 0.05 / 2  # z C / n
    moved = delta_norm(first, initial)
    # the noise alone has norm ≈ std·sqrt(d); the clipped mean adds at most C = 0.05
    assert abs(moved - std * math.sqrt(dimension)) < 0.05 + 4 * std, (moved, std * math.sqrt(dimension))
    eps = [r["dp"]["epsilon"] for r in rows]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(epsilon([1.0] * 3, 1e-5))
    assert rows[0]["dp"]["noise_std"] == pytest.approx(std)


def test_dp_noise_accounting_survives_resume(assets, tmp_path):  # noqa: F811
    config = make_config(assets, tmp_path / "res", num_rounds=2, dp="server", dp_clipping_norm=0.05)
    _run(config)
    config = make_config(assets, tmp_path / "res", num_rounds=3, dp="server", dp_clipping_norm=0.05)
    from smartfed.fl.server_app import run_server

    from .local_grid import LocalGrid

    run_server(LocalGrid(make_client_app(config), 3), config, resume=True, progress=False)
    rows = _rows(tmp_path / "res")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["dp"]["epsilon"] == pytest.approx(epsilon([1.0] * 3, 1e-5))


def test_a_client_that_does_not_clip_is_dropped(assets, tmp_path):  # noqa: F811
    config = make_config(assets, tmp_path / "cheat", dp="client", dp_noise_multiplier=0.0, dp_clipping_norm=0.01)
    app = make_client_app(config)

    def fault(msg, context):
        if int(context.node_config[keys.PARTITION_ID]) != 1:
            return None
        cfg = msg.content[keys.CONFIG]
        stripped = ConfigRecord({k: v for k, v in cfg.items() if k != KEY_CLIPPING_NORM})
        msg.content = RecordDict({keys.ARRAYS: msg.content[keys.ARRAYS], keys.CONFIG: stripped})
        return app(msg, context)  # trains and replies without clipping

    rows = _run(config, fault)
    dropped = [d for r in rows for d in r["dropped"]]
    assert dropped and all(d["partition"] == 1 and "did not clip" in d["reason"] for d in dropped)
    sampled_1 = [r for r in rows if 1 in r["clients"]]
    assert sampled_1 and all(r["clients_replied"] == 1 for r in sampled_1)


def test_server_side_dp_drops_a_no_op_reply_instead_of_dividing_by_zero(assets, tmp_path):  # noqa: F811
    """Flower's clipping divides by the delta's norm: a reply equal to the global state must not reach it."""
    config = make_config(assets, tmp_path / "noop", num_rounds=2, dp="server", dp_clipping_norm=0.05)
    app = make_client_app(config)

    def fault(msg, context):
        if int(context.node_config[keys.PARTITION_ID]) != 1:
            return None
        reply = app(msg, context)
        sent = msg.content[keys.ARRAYS].to_torch_state_dict()
        arrays = reply.content[keys.ARRAYS].to_torch_state_dict()
        reply.content[keys.ARRAYS] = ArrayRecord(torch_state_dict={k: sent.get(k, v) for k, v in arrays.items()})
        return reply

    rows = _run(config, fault)
    dropped = [d for r in rows for d in r["dropped"]]
    assert dropped and all(d["partition"] == 1 and "nothing for DP clipping" in d["reason"] for d in dropped)


# --- secure aggregation (Flower's SecAgg+) ---------------------------------------------------------------
def _secagg_run(assets, out: Path, fault=None, **overrides):  # noqa: F811
    from smartfed.fl.server_app import run_server

    from .local_grid import LocalGrid

    config = make_config(assets, out, num_rounds=1, **overrides)
    grid = LocalGrid(make_client_app(config), config.num_clients, fault=fault)
    run_server(grid, config, progress=False)
    return grid, _rows(out)


def test_secagg_gives_the_plain_mean_up_to_quantisation_and_hides_each_update(assets, tmp_path):  # noqa: F811
    range_ = 8.0
    grid, rows = _secagg_run(assets, tmp_path / "sa", secagg=True, secagg_clipping_range=range_)
    _run(make_config(assets, tmp_path / "plain", num_rounds=1))
    secure = load_file(tmp_path / "sa" / "checkpoints" / "round_0001.safetensors")
    plain = load_file(tmp_path / "plain" / "checkpoints" / "round_0001.safetensors")
    step = 2 * range_ / 2**22  # Flower's quantisation: 2^22 levels over [-range, range]
    for key in plain:
        torch.testing.assert_close(secure[key], plain[key], rtol=0, atol=4 * step)
    assert rows[0]["clients_replied"] == 2 and rows[0]["dropped"] == []
    # what the clients sent up: four SecAgg+ stages, and never a plain array of the router
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train) == 4 * 2
    for reply in train:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        assert "secaggplus_configs" in reply.content.config_records


def test_secagg_survives_a_client_dropping_out_mid_protocol(assets, tmp_path):  # noqa: F811
    from smartfed.fl.secagg import is_legacy_fit

    def fault(msg, context):
        if int(context.node_config[keys.PARTITION_ID]) == 2 and is_legacy_fit(msg.content):
            raise ConnectionError("gone after sharing its keys")
        return None

    _, rows = _secagg_run(assets, tmp_path / "drop", fault, secagg=True, sample_clients=3)
    assert rows[0]["clients_replied"] == 2
    assert rows[0]["dropped"] == [{"partition": 2, "node": 1002, "reason": "dropped out of SecAgg+", "attempt": 0}]
    router = load_file(tmp_path / "drop" / "checkpoints" / "round_0001.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in router.values())


@pytest.mark.slow
def test_secagg_on_the_simulation_engine_through_the_cli(assets, tmp_path):  # noqa: F811
    """`smartfed run --secagg`: Flower's SecAgg+ workflow and secaggplus_mod over Ray, 2 rounds."""
    from typer.testing import CliRunner

    from smartfed.cli import app

    out = tmp_path / "sim"
    config = make_config(assets, out, num_rounds=2)
    args = ["run", "--secagg", "--energy", "none", "--output_dir", str(out)]
    for key in ("model_name_or_path", "lora_pool", "num_clients", "sample_clients", "num_rounds", "local_steps"):
        args += [f"--{key}", str(getattr(config, key))]
    for key in ("batch_size", "topk_experts", "num_train", "num_test", "max_length", "max_new_tokens", "seed"):
        args += [f"--{key}", str(getattr(config, key))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients_replied"] == 2 for r in rows)
    assert json.loads((out / "config.json").read_text())["secagg"] is True
