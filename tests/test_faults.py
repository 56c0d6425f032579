"""Faults and hostile input on the server side: reply validation, robust combines, failed clients, short rounds.

Most runs use ``LocalGrid`` (the real ServerApp loop and ClientApp, in-process, messages
serialised as on the wire); one runs Flower's simulation engine with a client that
raises in round 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from smartfed.fl import keys
from smartfed.fl.client_app import make_client_app
from smartfed.fl.server_app import run_server
from smartfed.fl.validation import Candidate, ReplyRules, check_candidate, validate
from smartfed.methods.aggregation import (
    coordinate_median,
    delta_norm,
    norm_clipped,
    trimmed_mean,
    weighted_mean,
)
from smartfed.run.config import RunConfig

from .conftest import save_tiny_assets
from .local_grid import LOST, LocalGrid

# --- validation of one reply ---------------------------------------------------------------------
STATE = {"r.w": torch.zeros(3, 2), "r.b": torch.zeros(2)}
RULES = ReplyRules(expected=STATE, reference=STATE, max_update_norm=10.0, protected=frozenset(STATE))


def _cand(arrays=None, n=4, loss=1.0, partition=0):
    return Candidate(partition, 100 + partition, arrays if arrays is not None else dict(STATE), n, loss)


def test_a_valid_reply_passes():
    assert check_candidate(_cand({"r.w": torch.ones(3, 2), "r.b": torch.ones(2)}), RULES) is None


@pytest.mark.parametrize(
    ("arrays", "n", "loss", "reason"),
    [
        ({"r.w": torch.zeros(3, 2)}, 4, 1.0, "missing key(s) ['r.b']"),
        ({"r.w": torch.zeros(2, 3), "r.b": torch.zeros(2)}, 4, 1.0, "'r.w' is (2, 3) float32, expected (3, 2) float32"),
        ({"r.w": torch.zeros(3, 2, dtype=torch.float64), "r.b": torch.zeros(2)}, 4, 1.0, "float64, expected"),
        ({"r.w": torch.full((3, 2), float("nan")), "r.b": torch.zeros(2)}, 4, 1.0, "6 non-finite value(s)"),
        ({"r.w": torch.zeros(3, 2), "r.b": torch.tensor([float("inf"), 0.0])}, 4, 1.0, "'r.b' has 1 non-finite"),
        ({"r.w": torch.full((3, 2), 1e3), "r.b": torch.zeros(2)}, 4, 1.0, "exceeds the bound 10"),
        ({**STATE, "extra": torch.zeros(2, dtype=torch.int64)}, 4, 1.0, "expected a float tensor"),
        (dict(STATE), 0, 1.0, "num-examples=0"),
        (dict(STATE), True, 1.0, "num-examples=True"),
        (dict(STATE), None, 1.0, "num-examples=None"),
        (dict(STATE), 4, float("nan"), "train-loss=nan"),
        (dict(STATE), 4, None, "train-loss=None"),
    ],
)
def test_bad_replies_are_named(arrays, n, loss, reason):
    assert reason in check_candidate(_cand(arrays, n, loss), RULES)


def test_a_client_may_not_add_a_state_key_nor_extras_that_disagree():
    rules = ReplyRules(expected={"r.w": STATE["r.w"]}, protected=frozenset(STATE))
    assert "unexpected key 'r.b'" in check_candidate(_cand(), rules)
    # new extras (no reference yet): the majority signature wins, the odd one is dropped
    good = {**STATE, "importance.x": torch.ones(4)}
    odd = {**STATE, "importance.x": torch.ones(5)}
    cands = [_cand(good, partition=0), _cand(odd, partition=1), _cand(dict(good), partition=2)]
    accepted = validate(cands, RULES)
    assert [c.partition for c in accepted] == [0, 2]
    assert "differ from the other clients" in cands[1].reason


# --- robust combines -------------------------------------------------------------------------------
def _arrays(*values):
    return [{"w": torch.tensor([v, -v], dtype=torch.float32)} for v in values]


def test_median_and_trimmed_mean_ignore_an_outlier_the_mean_follows():
    arrays, weights = _arrays(1.0, 2.0, 3.0, 1e6), [1.0, 1.0, 1.0, 100.0]
    assert weighted_mean(arrays, weights)["w"][0] > 9e5  # one liar with a big weight moves FedAvg
    torch.testing.assert_close(coordinate_median(arrays, weights)["w"], torch.tensor([2.5, -2.5]))
    torch.testing.assert_close(trimmed_mean(0.25)(arrays, weights)["w"], torch.tensor([2.5, -2.5]))
    torch.testing.assert_close(coordinate_median(_arrays(5.0, 1.0, 3.0), [1, 1, 1])["w"], torch.tensor([3.0, -3.0]))
    with pytest.raises(ValueError, match=r"beta=0\.5"):
        trimmed_mean(0.5)


def test_norm_clipping_bounds_each_clients_delta():
    reference = {"w": torch.tensor([1.0, 1.0])}
    arrays = [{"w": torch.tensor([4.0, 5.0])}, {"w": torch.tensor([1.5, 1.0])}]  # deltas of norm 5 and 0.5
    combine = norm_clipped(lambda a, w: {"a": a[0]["w"], "b": a[1]["w"]}, reference, 1.0)
    out = combine(arrays, [1.0, 1.0])
    torch.testing.assert_close(out["a"], torch.tensor([1.6, 1.8]))  # 1 + (3, 4)/5
    torch.testing.assert_close(out["b"], torch.tensor([1.5, 1.0]))  # already within the bound
    assert delta_norm({"w": out["a"]}, reference) == pytest.approx(1.0)


# --- end to end on LocalGrid --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fault-assets")
    model_dir, a, b = save_tiny_assets(root)
    return {"model": str(model_dir), "pool": f"{a},{b}"}


def make_config(assets, out: Path, **overrides) -> RunConfig:
    values = dict(
        model_name_or_path=assets["model"],
        lora_pool=assets["pool"],
        num_clients=3,
        sample_clients=2,
        num_rounds=3,
        local_steps=2,
        batch_size=4,
        learning_rate=5e-2,
        topk_experts=4,
        enable_eeqa=True,
        num_train=24,
        num_test=4,
        max_length=32,
        max_new_tokens=2,
        eval_every=3,
        energy="none",
        seed=7,
        output_dir=str(out),
    )
    values.update(overrides)
    return RunConfig(**values)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _partition(msg: Message, context) -> int:
    return int(context.node_config[keys.PARTITION_ID])


def _round(msg: Message) -> int:
    return int(msg.content[keys.CONFIG][keys.SERVER_ROUND])


def _run(config: RunConfig, fault=None) -> list[dict]:
    run_server(LocalGrid(make_client_app(config), config.num_clients, fault=fault), config, progress=False)
    return _rows(Path(config.output_dir))


def _forged(msg: Message, arrays: dict[str, torch.Tensor], n=8, loss=1.0) -> Message:
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: loss, keys.STATE_BYTES: 0, keys.EXTRAS_BYTES: 0})
    return Message(RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=arrays), keys.METRICS: metrics}), reply_to=msg)


def test_hostile_replies_are_dropped_and_logged(assets, tmp_path):
    """Each round a different kind of garbage from partition 1; the run finishes on partitions 0 and 2."""
    app = make_client_app(make_config(assets, tmp_path / "x"))

    def fault(msg, context):
        if _partition(msg, context) != 1:
            return None
        if _round(msg) == 4:
            return Message(RecordDict(), reply_to=msg)  # an empty reply
        honest = app(msg, context).content[keys.ARRAYS].to_torch_state_dict()
        name = sorted(k for k in honest if ".router." in k)[0]
        forged = {
            1: {**honest, name: torch.full_like(honest[name], float("nan"))},
            2: {**honest, name: honest[name] * 1e6},  # a "boosted" update
            3: {k: v for k, v in honest.items() if k != name},
        }
        return _forged(msg, forged[_round(msg)])

    config = make_config(assets, tmp_path / "run", sample_clients=3, num_rounds=4)
    rows = _run(config, fault)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    reasons = {r["round"]: [d["reason"] for d in r["dropped"]] for r in rows}
    assert [d["partition"] for r in rows for d in r["dropped"]] == [1, 1, 1, 1]
    assert "non-finite" in reasons[1][0] and "exceeds the bound" in reasons[2][0] and "missing key" in reasons[3][0]
    assert reasons[4] == ["reply lacks its arrays or metrics record"]
    assert all(r["clients_replied"] == 2 and not r["skipped"] for r in rows)
    final = load_file(Path(config.output_dir) / "checkpoints" / "round_0004.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in final.values())


def test_a_client_that_raises_or_times_out_is_dropped_and_the_next_round_samples_again(assets, tmp_path):
    def fault(msg, context):
        if _round(msg) == 2 and _partition(msg, context) == 1:
            raise RuntimeError("disk full")
        if _round(msg) == 3 and _partition(msg, context) == 2:
            return LOST  # no reply by the round timeout
        return None

    config = make_config(assets, tmp_path / "run", round_timeout=123.0)
    grid = LocalGrid(make_client_app(config), config.num_clients, fault=fault)
    run_server(grid, config, progress=False)
    rows = _rows(Path(config.output_dir))
    assert grid.timeouts[1:] == [123.0] * 3  # after the partition query, every round waits --round_timeout
    assert [r["clients"] for r in rows] == [[0, 1], [1, 2], [1, 2]]  # sampling is unchanged by failures
    assert rows[1]["dropped"] == [
        {"partition": 1, "node": 1001, "reason": "client error 2: RuntimeError: disk full", "attempt": 0}
    ]
    assert rows[2]["dropped"][0]["reason"] == "no reply within the round timeout"
    assert [r["clients_replied"] for r in rows] == [2, 1, 1]


@pytest.mark.parametrize(("policy", "attempts"), [("retry", 3), ("skip", 1), ("fail", 1)])
def test_a_round_short_of_min_fit_clients_is_retried_skipped_or_fails(assets, tmp_path, policy, attempts):
    def fault(msg, context):
        if _round(msg) == 2:
            raise ConnectionError("link down")
        return None

    config = make_config(assets, tmp_path / "run", min_fit_clients=2, on_insufficient=policy)
    if policy == "fail":
        with pytest.raises(RuntimeError, match="min_fit_clients=2"):
            _run(config, fault)
        return
    rows = _run(config, fault)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1]["skipped"] and rows[1]["attempts"] == attempts and rows[1]["train_loss"] is None
    assert len(rows[1]["dropped"]) == 2 * attempts
    if policy == "retry":  # each retry re-samples with its own seed
        assert len({d["attempt"] for d in rows[1]["dropped"]}) == 3
    ckpt = Path(config.output_dir) / "checkpoints"
    one, two = load_file(ckpt / "round_0001.safetensors"), load_file(ckpt / "round_0002.safetensors")
    for key in one:  # a skipped round leaves the global state as it was
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)
    assert not rows[2]["skipped"]


def test_robust_aggregation_flag_resists_a_boosting_client(assets, tmp_path):
    """With the norm bound off, FedAvg follows a client adding +50 to every router weight; the median does not."""

    moved = {}
    for rule in ("mean", "median"):
        config = make_config(
            assets, tmp_path / rule, sample_clients=3, num_rounds=1, max_update_norm=0.0, aggregation=rule
        )
        app = make_client_app(config)

        def fault(msg, context, app=app):
            if _partition(msg, context) != 0:
                return None
            honest = app(msg, context).content[keys.ARRAYS].to_torch_state_dict()
            return _forged(msg, {k: v + 50.0 if ".router." in k else v for k, v in honest.items()}, n=10_000)

        _run(config, fault)
        final = load_file(Path(config.output_dir) / "checkpoints" / "round_0001.safetensors")
        moved[rule] = max(float(v.abs().max()) for k, v in final.items() if ".router." in k)
    assert moved["mean"] > 40 and moved["median"] < 5, moved


# --- Flower's simulation engine ----------------------------------------------------------------------
@pytest.mark.slow
def test_simulation_client_raising_in_round_2_is_dropped(assets, tmp_path):
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    from smartfed.fl.client_app import handle_query, handle_train
    from smartfed.fl.server_app import make_server_app

    config = make_config(assets, tmp_path / "sim", num_rounds=3)
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(msg.content["config"]["server-round"]) == 2 and int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("client 1 crashed in round 2")
        return handle_train(msg, context, config)

    flwr_run_simulation(
        server_app=make_server_app(config, progress=False),
        client_app=app,
        num_supernodes=config.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False, "logging_level": "error", "log_to_driver": False},
        },
    )
    rows = _rows(tmp_path / "sim")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1]["clients"] == [1, 2] and rows[1]["clients_replied"] == 1
    (drop,) = rows[1]["dropped"]
    assert drop["partition"] == 1 and "client 1 crashed in round 2" in drop["reason"]
    assert rows[0]["dropped"] == [] and rows[2]["dropped"] == [] and rows[2]["clients_replied"] == 2
