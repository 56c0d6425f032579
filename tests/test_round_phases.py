"""The server round in phases: the strategy serves a bound ``RoundContext``, and clients weigh by what their method reports.

Unit tests drive ``SmartFedStrategy`` with hand-made replies (no model); the end-to-end tests
run the real ServerApp loop on ``LocalGrid`` with a method that reports its own ``num_examples``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from smartfed.fl import keys
from smartfed.fl.round import RoundContext
from smartfed.fl.strategy import SmartFedStrategy
from smartfed.fl.validation import Candidate
from smartfed.methods import ClientUpdate, Method, get_method_class, load_builtin_methods, weighted_mean

from .test_faults import _rows, _run, assets, make_config  # noqa: F401 (assets is a fixture)

NODES = {0: 100, 1: 101, 2: 102}  # partition -> node
UNBOUND = r"only inside `with strategy\.bound\(ctx\)`"


class _Plain(Method):
    """The base FedAvg aggregation over whatever arrays the replies hold (no model)."""

    name, summary = "plain", "test double"

    def build(self, model, pool, generator):
        return model

    def get_state(self, model):
        return {}

    def set_state(self, model, state):
        pass


@pytest.fixture
def strategy() -> SmartFedStrategy:
    # what Flower's ServerApp runtime sets before main(): messages take their ids from it (as LocalGrid does)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    s = SmartFedStrategy(num_clients=3, sample_clients=2, seed=0)
    s.node_of_partition = dict(NODES)
    return s


def _context(**overrides) -> RoundContext:
    values = dict(
        server_round=1,
        method=_Plain(),
        combine=weighted_mean,
        state={"w": torch.zeros(2), "v": torch.zeros(1)},  # server key order: w, v
        extras={"imp": torch.ones(3)},
    )
    values.update(overrides)
    return RoundContext(**values)


def _reply(partition: int, arrays: dict[str, torch.Tensor], n: int, loss: float = 1.0) -> Message:
    sent = Message(RecordDict(), dst_node_id=NODES[partition], message_type=MessageType.TRAIN)
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: loss})
    content = RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=arrays), keys.METRICS: metrics})
    return Message(content, reply_to=sent)


def _client(partition: int, value: float) -> dict[str, torch.Tensor]:
    # the reply's own key order differs from the server's: hold puts the state back in server order
    return {"imp": torch.full((3,), value), "v": torch.full((1,), value), "w": torch.full((2,), value)}


def test_the_strategy_serves_only_a_bound_round(strategy):
    with pytest.raises(RuntimeError, match=UNBOUND):
        strategy.aggregate_train(1, [])
    with pytest.raises(RuntimeError, match=UNBOUND):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None)
    ctx = _context()
    with pytest.raises(ValueError, match="boom"), strategy.bound(ctx):
        raise ValueError("boom")
    with strategy.bound(ctx), pytest.raises(RuntimeError, match="rounds do not nest"), strategy.bound(_context()):
        pass
    with pytest.raises(RuntimeError, match=UNBOUND):  # unbound again, whatever happened
        strategy.round_context()


def test_configure_train_samples_the_bound_attempt_and_sends_its_extras(strategy):
    ctx = _context(attempt=1)
    with strategy.bound(ctx):
        messages = list(strategy.configure_train(1, ArrayRecord(torch_state_dict=ctx.state), ConfigRecord(), None))
    assert sorted(m.metadata.dst_node_id for m in messages) == [NODES[p] for p in strategy.sample_partitions(1, 1)]
    down = messages[0].content[keys.ARRAYS].to_torch_state_dict()
    assert list(down) == ["w", "v", "imp"] and int(messages[0].content[keys.CONFIG][keys.SERVER_ROUND]) == 1


def test_aggregation_returns_its_results_in_the_round_context(strategy):
    ctx = _context()
    replies = {2: _reply(2, _client(2, 3.0), n=3), 0: _reply(0, _client(0, 1.0), n=1)}
    accepted = [Candidate(p, NODES[p], _client(p, v), n, 1.0) for p, v, n in ((2, 3.0, 3), (0, 1.0, 1))]
    with strategy.bound(ctx):
        held = strategy.hold(replies, accepted)
        aggregated, metrics = strategy.aggregate_train(1, held)
    assert list(aggregated.keys()) == ["w", "v"]  # the state only, in the first reply's (= server) order
    merged = aggregated.to_torch_state_dict()
    torch.testing.assert_close(merged["w"], torch.full((2,), (1.0 * 1 + 3.0 * 3) / 4))  # FedAvg by num-examples
    assert [(u.partition, u.num_examples) for u in ctx.updates] == [(0, 1), (2, 3)]  # by partition, not arrival
    assert set(ctx.held_extras) == {0, 2} and list(ctx.merged_extras) == ["imp"]
    torch.testing.assert_close(ctx.merged_extras["imp"], torch.full((3,), 2.5))
    assert int(metrics["num-replies"]) == 2


def test_dp_rounds_weigh_every_client_equally(strategy):
    ctx = _context(uniform_weights=True)
    replies = {p: _reply(p, _client(p, float(p)), n=10 * p + 1) for p in (0, 2)}
    with strategy.bound(ctx):
        strategy.aggregate_train(
            1, strategy.hold(replies, [Candidate(p, NODES[p], _client(p, float(p)), 1, 1.0) for p in replies])
        )
    assert [u.num_examples for u in ctx.updates] == [1, 1]
    torch.testing.assert_close(ctx.merged_extras["imp"], torch.full((3,), 1.0))


def test_a_reply_with_other_state_keys_is_named(strategy):
    first = _reply(0, {"w": torch.zeros(2), "v": torch.zeros(1)}, n=1)
    other = _reply(2, {"w": torch.zeros(2)}, n=1)
    with strategy.bound(_context()), pytest.raises(RuntimeError, match=r"client 2 \(node 102\).*\['v'\]"):
        strategy.aggregate_train(1, [first, other])


# --- end to end: the server weighs by the method's LocalResult.num_examples ------------------------------
REPORTED = {0: 3, 1: 11, 2: 5}  # what the patched method says it trained on, per partition


def _spy(monkeypatch, method: str, report: bool) -> list[list[ClientUpdate]]:
    """Record every aggregation's updates; with ``report``, the method reports REPORTED and loss = partition + 1."""
    load_builtin_methods()
    cls = get_method_class(method)
    seen: list[list[ClientUpdate]] = []
    aggregate, local_train = cls.aggregate, cls.local_train

    def spy_aggregate(self, updates, combine=weighted_mean):
        seen.append(list(updates))
        return aggregate(self, updates, combine)

    def reporting_train(self, model, batches, config):
        result = local_train(self, model, batches, config)
        return dataclasses.replace(result, num_examples=REPORTED[config.partition], train_loss=config.partition + 1.0)

    monkeypatch.setattr(cls, "aggregate", spy_aggregate)
    if report:
        monkeypatch.setattr(cls, "local_train", reporting_train)
    return seen


def _expected_loss(row: dict) -> float:
    """The round's train loss when client p reports REPORTED[p] examples and a loss of p + 1."""
    total = sum(REPORTED[p] for p in row["clients"])
    return sum(REPORTED[p] * (p + 1.0) for p in row["clients"]) / total


def test_the_server_weighs_by_the_num_examples_the_method_reports(assets, tmp_path, monkeypatch):  # noqa: F811
    # 30 examples over 3 clients: 10 each, while a round trains on local_steps × batch_size = 2 × 4 = 8
    with monkeypatch.context() as patch:
        seen = _spy(patch, "smartfed", report=False)
        _run(make_config(assets, tmp_path / "default", num_rounds=1, num_train=30))
    assert [u.num_examples for u in seen[0]] == [10, 10]  # the node's dataset size (FedAvg's n_k), not the 8 trained

    seen = _spy(monkeypatch, "smartfed", report=True)
    rows = _run(make_config(assets, tmp_path / "reported", num_rounds=1, num_train=30))
    (updates,) = seen
    assert [(u.partition, u.num_examples) for u in updates] == [(p, REPORTED[p]) for p in rows[0]["clients"]]
    assert rows[0]["train_loss"] == pytest.approx(_expected_loss(rows[0]))


def test_secagg_weighs_by_the_num_examples_the_method_reports(assets, tmp_path, monkeypatch):  # noqa: F811
    _spy(monkeypatch, "smartfed", report=True)
    rows = _run(make_config(assets, Path(tmp_path / "sa"), num_rounds=1, secagg=True))
    assert rows[0]["clients_replied"] == 2
    assert rows[0]["train_loss"] == pytest.approx(_expected_loss(rows[0]))
