"""Expert and knowledge-reuse baselines and SmartFed ablations: rules by hand, then 2-round federated runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smartfed.methods import ClientUpdate, LocalTrainConfig, get_method_class, list_methods, load_builtin_methods
from smartfed.methods.a3smoe import activation_aware_weights, client_top_k
from smartfed.methods.ablations import ABLATIONS
from smartfed.methods.fedlease import CLUSTER_KEY, FedLeaseLinear, cluster_clients
from smartfed.methods.lorahub import LorahubOptions, LorahubSearch
from smartfed.methods.merge import MergeOptions, merge_pool
from smartfed.more import LoraPool
from smartfed.run.config import RunConfig

from .conftest import make_adapter, run_in_process, tiny_llama, tiny_run_config

load_builtin_methods()
EXPERT_METHODS = ("fedlease", "a3smoe", "merge", "lorahub", "mole", "smartfed_module")


def _config(**overrides) -> RunConfig:
    values = dict(lora_rank=4, lora_alpha=8.0, topk_experts=4, num_clients=4, energy="none")
    values.update(overrides)
    return RunConfig(**values)


def _update(partition: int, examples: int, arrays: dict[str, torch.Tensor]) -> ClientUpdate:
    return ClientUpdate(partition=partition, arrays=arrays, num_examples=examples, train_loss=0.0)


@pytest.fixture(scope="module")
def pool_and_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts_pool")
    base = tiny_llama(seed=0)
    a = make_adapter(base, root / "up", r=4, alpha=8, seed=1)
    b = make_adapter(base, root / "down", r=4, alpha=8, seed=2)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    return LoraPool.load([a, b]), ids


def test_every_method_is_registered_with_a_summary():
    methods = list_methods()
    for name in EXPERT_METHODS:
        assert name in methods and len(methods[name]) > 20
    for name, overrides in ABLATIONS.items():  # each ablation is a valid run: a registered method, its fields as given
        config = RunConfig(**overrides)
        assert config.method in methods and {k: getattr(config, k) for k in overrides} == overrides, name
    configs = [RunConfig(**overrides).to_dict() for overrides in ABLATIONS.values()]
    assert all(a != b for i, a in enumerate(configs) for b in configs[i + 1 :])  # no ablation repeats another
    assert ABLATIONS["smartfed"] == {"method": "smartfed"}  # the reference is the default run


# --- A³SMoE -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("beta", "k"), [(1.0, 4), (0.5, 2), (0.3, 1), (0.1, 1)])
def test_a3smoe_client_top_k(beta, k):
    assert client_top_k(4, beta, num_experts=8) == k
    assert client_top_k(16, 1.0, num_experts=8) == 8  # bounded by the matrix's experts


def test_a3smoe_weights_by_hand():
    data = torch.tensor([30.0, 10.0])  # p_d = (0.75, 0.25)
    freq = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    k = torch.tensor([2, 1])
    w = activation_aware_weights(data, freq, k, gamma=2.0)
    # expert 0: 0.75·(0.5/2)² = 0.046875, 0.25·(0.2/1)² = 0.01 -> normalised
    # expert 1: 0.75·(0.25)² = 0.046875, 0.25·(0.3)² = 0.0225; expert 2: 0 and 0.25·0.25 = 0.0625
    expected = torch.tensor(
        [[0.046875 / 0.056875, 0.046875 / 0.069375, 0.0], [0.01 / 0.056875, 0.0225 / 0.069375, 1.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(0), torch.ones(3, dtype=torch.float64))
    # γ = 0 is FedAvg; an expert nobody used falls back to the data shares
    torch.testing.assert_close(activation_aware_weights(data, freq, k, 0.0)[:, 1], torch.tensor([0.75, 0.25]).double())
    unused = activation_aware_weights(data, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), k, 1.0)
    torch.testing.assert_close(unused[:, 1], torch.tensor([0.75, 0.25]).double())


def test_a3smoe_aggregates_router_rows_with_the_weights():
    method = get_method_class("a3smoe")(_config(method="a3smoe", client_budgets="1,0.5", method_options="gamma=1"))
    m = "model.layers.0.self_attn.q_proj"
    w0, w1 = torch.arange(6.0).view(3, 2), -torch.arange(6.0).view(3, 2)
    b0, b1 = torch.ones(3), torch.zeros(3)
    f0, f1 = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    ups = [
        _update(0, 30, {f"{m}.router.weight": w0, f"{m}.router.bias": b0, f"activation.{m}": f0}),
        _update(1, 10, {f"{m}.router.weight": w1, f"{m}.router.bias": b1, f"activation.{m}": f1}),
    ]
    merged = method.aggregate(ups)
    # K: client 0 has β=1 -> 4 (bounded by M=3 -> 3), client 1 β=0.5 -> 2
    raw = torch.stack([0.75 * f0 / 3, 0.25 * f1 / 2])
    weights = torch.where(raw.sum(0) > 0, raw / raw.sum(0).clamp_min(1e-30), torch.tensor([[0.75], [0.25]]))
    torch.testing.assert_close(merged[f"{m}.router.weight"], weights[0, :, None] * w0 + weights[1, :, None] * w1)
    torch.testing.assert_close(merged[f"{m}.router.bias"], weights[0] * b0 + weights[1] * b1)
    assert weights[:, 0].tolist() == [1.0, 0.0] and weights[:, 2].tolist() == [0.0, 1.0]


def test_a3smoe_client_counts_activations_within_its_budget(pool_and_inputs):
    pool, ids = pool_and_inputs
    method = get_method_class("a3smoe")(_config(method="a3smoe", client_budgets="0.5"))
    model = method.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    method.prepare_round(model, {}, {}, LocalTrainConfig(1e-2, budget=0.5))
    assert set(model.quotas().values()) == {2}
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    result = method.local_train(model, [batch], LocalTrainConfig(1e-2, budget=0.5))
    freq = {k: v for k, v in result.extras.items() if k.startswith("activation.")}
    assert len(freq) == 4
    for v in freq.values():  # frequencies over M=8 experts, each token keeps exactly K=2
        assert v.shape == (8,) and math.isclose(float(v.sum()), 1.0, rel_tol=1e-5)
        assert int((v > 0).sum()) >= 2 and float(v.max()) <= 0.5 + 1e-6  # K=2 of 8 per token


# --- SmartFed -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "reads_importance"),
    [({}, False), ({"enable_eeqa": True}, True), ({"client_budgets": "1,0.5"}, True)],
)
def test_smartfed_sends_importance_only_when_someone_reads_it(pool_and_inputs, overrides, reads_importance):
    pool, ids = pool_and_inputs
    method = get_method_class("smartfed")(_config(method="smartfed", **overrides))
    model = method.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    result = method.local_train(model, [batch], LocalTrainConfig(1e-2))
    assert method.needs_importance() is reads_importance
    layers = model.more_layers()
    if not reads_importance:  # neither computed nor sent: no EEQA and every client at β = 1
        assert result.extras == {}
        assert all(int(layer.stats()["tokens"]) == 0 for layer in layers.values())
        return
    assert set(result.extras) == {f"importance.{name}" for name in layers}
    for name, value in result.extras.items():
        layer = layers[name.removeprefix("importance.")]
        assert value.shape == (layer.num_experts,) and bool(torch.isfinite(value).all()) and float(value.sum()) > 0
        assert layer.stats()["tokens"] == ids.numel()


# --- FedLEASE -----------------------------------------------------------------------------------
@pytest.mark.parametrize("planted", [2, 3])
def test_fedlease_clustering_finds_the_planted_number_of_clusters(planted):
    g = torch.Generator().manual_seed(planted)
    centres = torch.randn(planted, 64, generator=g)
    members = torch.arange(12) % planted
    vectors = centres[members] + 0.05 * torch.randn(12, 64, generator=g)
    labels, score = cluster_clients(vectors, max_clusters=5)
    assert len(set(labels.tolist())) == planted and score > 0.5
    # the clusters are exactly the planted groups (labels numbered by first appearance)
    assert labels.tolist() == members.tolist()
    assert cluster_clients(vectors[:2], max_clusters=5)[0].tolist() == [0, 0]  # too few for silhouette


def test_fedlease_router_always_keeps_the_own_expert():
    base = torch.nn.Linear(8, 6)
    layer = FedLeaseLinear(base, slots=4, rank=2, scaling=1.0)
    torch.nn.init.normal_(layer.router, std=3.0, generator=torch.Generator().manual_seed(0))
    layer.order = [2, 0, 1]  # own expert 2 first; M = 3 -> 5 router outputs
    gates = layer.gates(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)))
    assert gates.shape == (50, 3)
    assert (gates[:, 0] > 0).all()  # pigeonhole: M kept of 2M−1 with only M−1 others
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    assert int((gates[:, 1:] > 0).sum(-1).max()) <= 2 and bool((gates[:, 1:] == 0).any())


def test_fedlease_averages_each_expert_within_its_cluster():
    method = get_method_class("fedlease")(_config(method="fedlease", method_options="max_clusters=2"))
    keys = ("m.lora_A.0", "m.lora_A.1", "router.0.m", "router.1.m")

    def state(value: float, cluster: int) -> dict[str, torch.Tensor]:
        arrays = {k: torch.full((2,), 9.0) for k in keys}  # what the server sent
        arrays.update({k: torch.full((2,), value) for k in keys if str(cluster) in k.split(".")})
        arrays.update({"fedlease.assignment": torch.tensor([0, -1, 1, 0]), "fedlease.num_experts": torch.tensor(2)})
        return {**arrays, CLUSTER_KEY: torch.tensor(float(cluster))}

    merged = method.aggregate(
        [_update(0, 30, state(1.0, 0)), _update(1, 10, state(5.0, 0)), _update(3, 10, state(2.0, 0))]
    )
    torch.testing.assert_close(merged["m.lora_A.0"], torch.full((2,), (30 + 50 + 20) / 50))
    torch.testing.assert_close(merged["router.0.m"], torch.full((2,), 2.0))
    torch.testing.assert_close(merged["m.lora_A.1"], torch.full((2,), 9.0))  # no member of cluster 1: kept
    assert merged["fedlease.assignment"].tolist() == [0, 0, 1, 0]  # client 1 joined cluster 0
    assert CLUSTER_KEY not in merged


# --- LoRAHub ------------------------------------------------------------------------------------
def test_lorahub_search_improves_a_planted_composition_and_replays(pool_and_inputs):
    pool, ids = pool_and_inputs
    method = get_method_class("lorahub")(_config(method="lorahub", method_options="population=4"))
    model = method.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    planted = torch.tensor([1.0, -0.5])
    with torch.no_grad():
        model.compose(planted)
        target = model(input_ids=ids).logits

        def loss(w: torch.Tensor) -> float:
            model.compose(w.float())
            # scaled so that the adapters' effect outweighs the L1 term, as on a real task
            return 100 * float(((model(input_ids=ids).logits - target) ** 2).mean())

    search = LorahubSearch(2, LorahubOptions(population=4), seed=0)
    start = search.objective(np.zeros(2), loss(torch.zeros(2)))
    for _ in range(12):  # 48 evaluations, past the planned budget of 40
        search.tell([loss(torch.from_numpy(c)) for c in search.ask()])
    assert search.best_objective < 0.5 * start
    assert np.abs(search.best - planted.numpy()).max() < 0.5
    replayed = LorahubSearch(2, LorahubOptions(population=4), seed=0)
    replayed.replay(json.loads(json.dumps(search.history)))  # through JSON, as in the run payload
    np.testing.assert_array_equal(replayed.ask(), search.ask())
    assert replayed.best_objective == search.best_objective


def test_lorahub_server_round_and_resume_from_payload(pool_and_inputs):
    pool, ids = pool_and_inputs
    config = _config(method="lorahub", method_options="population=3")
    server = get_method_class("lorahub")(config)
    model = server.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    result = server.local_train(model, [batch], LocalTrainConfig(1e-2))
    assert result.extras["lorahub.losses"].shape == (3,)
    update = server.server_update(1, model, result.extras)
    state = server.get_state(model)
    restored = get_method_class("lorahub")(config)
    other = restored.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    restored.set_state(other, state)
    restored.restore_payload(other, json.loads(json.dumps(update.payload)))
    torch.testing.assert_close(other.weights, model.weights)
    for search in (restored.search, server.search):  # both go on identically from the same pending population
        search.tell([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(restored.search.ask(), server.search.ask())


# --- MoLE, merge and the module-level ablation --------------------------------------------------
def test_mole_gates_are_averaged_by_examples_and_a_zero_gate_is_the_mean_merge(pool_and_inputs):
    pool, ids = pool_and_inputs
    method = get_method_class("mole")(_config(method="mole"))
    model = method.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    state = method.get_state(model)
    assert len(state) == 4 and all(not v.any() for v in state.values())  # 2 layers x (weight, bias)
    g = torch.Generator().manual_seed(4)
    one = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    two = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    merged = method.aggregate([_update(0, 10, one), _update(1, 30, two)])
    for key, value in merged.items():
        torch.testing.assert_close(value, (10 * one[key] + 30 * two[key]) / 40)
    # zero gates: softmax gives each adapter 1/2, the exact mean of the two updates (PEFT's cat merge)
    with torch.no_grad():
        mole_logits = model(input_ids=ids).logits
        merged_model = merge_pool(tiny_llama(), pool, MergeOptions(combination_type="cat", weights="0.5:0.5"))
        torch.testing.assert_close(mole_logits, merged_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    method.set_state(model, merged)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, mole_logits)


def test_module_level_router_keeps_k_adapters_and_respects_budgets(pool_and_inputs):
    pool, ids = pool_and_inputs
    method = get_method_class("smartfed_module")(_config(method="smartfed_module", topk_experts=2, router_init="zeros"))
    model = method.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    state = method.get_state(model)
    assert {tuple(v.shape) for k, v in state.items() if k.endswith("weight")} == {(2, 32)}  # N=2 adapters
    with torch.no_grad():  # K = N with a zero router is the sum of the adapters
        merged = merge_pool(tiny_llama(), pool, MergeOptions(combination_type="cat"))
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    method.prepare_round(model, {}, {}, LocalTrainConfig(1e-2, budget=0.5))
    assert {r.top_k for r in method.gates(model).values()} == {1}
    # whole adapters have no rank space: --router rank (the default) still gives linear routers over the input
    ranked = get_method_class("smartfed_module")(_config(method="smartfed_module", router="rank"))
    ranked_state = ranked.get_state(ranked.build(tiny_llama(), pool, torch.Generator().manual_seed(0)))
    assert {tuple(v.shape) for k, v in ranked_state.items() if k.endswith("weight")} == {(2, 32)}


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("merge", "combination_type=avg", "combination_type='avg'"),
        ("merge", "density=0", "density=0.0"),
        ("lorahub", "population=0", "population=0"),
        ("lorahub", "optimizer=Nope", "optimizer='Nope'"),
        ("fedlease", "max_clusters=1", "max_clusters=1"),
        ("fedlease", "linkage=ward", "linkage='ward'"),
        ("a3smoe", "gamma=-1", "gamma=-1.0"),
        ("mole", "temperature=0", "temperature=0.0"),
    ],
)
def test_bad_method_options_quote_the_value(method, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_method_class(method)(_config(method=method, method_options=options))


# --- every method through Flower's simulation and the run folder -------------------------------
@pytest.mark.parametrize("method", EXPERT_METHODS)
def test_two_round_run(run_assets, tmp_path, method):
    out = tmp_path / method
    config = tiny_run_config(
        run_assets, out, method, sample_clients=3, topk_experts=4, client_budgets="1,0.5"
    )  # fedlease clusters the 3 warm-up clients
    run_in_process(config)  # the ServerApp and ClientApp without Ray (test_methods_lora runs fedit on Ray)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients_replied"] == 3 and row["eval_n"] == 4 and math.isfinite(row["train_loss"])
    final = load_file(out / "checkpoints" / "round_0002.safetensors")
    assert final and all(v.isfinite().all() for v in final.values() if v.is_floating_point())
    if method == "fedlease":
        assert rows[0]["fedlease_experts"] >= 1 and sum(rows[1]["fedlease_cluster_sizes"]) == 3
        assert any(v.any() for k, v in final.items() if ".lora_B.0" in k)  # expert 0 from the warm-up LoRAs
    if method == "lorahub":
        assert (
            len(rows[1]["lorahub_weights"]) == 2
            and rows[1]["lorahub_best_objective"] <= rows[0]["lorahub_best_objective"]
        )
    if method == "a3smoe":
        # 3 clients keep K = 4 or 2 of the 8 experts for every token of their batches (random routers): no expert
        # of any matrix goes unused in a round, so Eq. 7 sees no idle row; counting used experts as idle gives 1.0
        assert [r["idle_expert_fraction"] for r in rows] == [0.0, 0.0]
    if method == "merge":  # nothing trains: the state is only the merge weights (a zero-round baseline)
        assert set(final) == {"merge.weights"}
    if method in ("mole", "smartfed_module", "a3smoe"):  # the routers/gates moved
        assert any(v.any() for k, v in final.items() if k.endswith("weight"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["rounds"] == 2
