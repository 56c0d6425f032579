"""Knowledge-free baselines (LoRA from scratch): aggregation rules by hand, and 2-round federated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smartfed.data import char_tokenizer, load_task
from smartfed.eval import evaluate_task, generate_answers, score
from smartfed.fl.simulation import run_simulation
from smartfed.methods import ClientUpdate, LocalTrainConfig, get_method_class, load_builtin_methods
from smartfed.methods.flora import stack_lora
from smartfed.methods.lora_common import client_rank, lora_layers, lora_state, truncate_state
from smartfed.run.config import RunConfig

from .conftest import run_in_process, tiny_llama, tiny_run_config

load_builtin_methods()

A0, B0 = "m.lora_A.weight", "m.lora_B.weight"


def _config(**overrides) -> RunConfig:
    values = dict(lora_rank=4, lora_alpha=8.0, lora_target_modules="q_proj,v_proj", energy="none")
    values.update(overrides)
    return RunConfig(**values)


def _method(name: str, **overrides):
    return get_method_class(name)(_config(method=name, **overrides))


def _truncated(state, rank):
    return truncate_state(state, rank)


def _update(partition: int, examples: int, **arrays: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(partition=partition, arrays=arrays, num_examples=examples, train_loss=0.0)


# --- shared helpers -------------------------------------------------------------------------------
def test_seeded_build_is_identical_across_processes_and_leaves_the_global_rng_alone():
    method = _method("fedit")
    base = tiny_llama()  # (seeds the global RNG itself)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    one = method.build(base, None, torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3), expected_next)  # PEFT's own init did not consume the global RNG
    two = method.build(tiny_llama(), None, torch.Generator().manual_seed(5))
    other = method.build(tiny_llama(), None, torch.Generator().manual_seed(6))
    s1, s2, s3 = lora_state(one), lora_state(two), lora_state(other)
    assert len(s1) == 8  # q, v in 2 layers, A and B each
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1 if "lora_A" in k)
    assert all(not v.any() for k, v in s1.items() if "lora_B" in k)  # B = 0: the model starts as the base
    assert [p for p in one.parameters() if p.requires_grad] and all(
        "lora_" in n for n, p in one.named_parameters() if p.requires_grad
    )


@pytest.mark.parametrize(("beta", "rank"), [(1.0, 8), (0.5, 4), (0.3, 2), (0.01, 1)])
def test_client_rank(beta, rank):
    assert client_rank(8, beta) == rank


def test_fedit_averages_a_and_b_separately_by_examples():
    updates = [
        _update(0, 1, **{A0: torch.tensor([[1.0, 2.0]]), B0: torch.tensor([[2.0], [0.0]])}),
        _update(1, 3, **{A0: torch.tensor([[5.0, -2.0]]), B0: torch.tensor([[-2.0], [4.0]])}),
    ]
    merged = _method("fedit").aggregate(updates)
    # (1·x0 + 3·x1) / 4 by hand
    torch.testing.assert_close(merged[A0], torch.tensor([[4.0, -1.0]]))
    torch.testing.assert_close(merged[B0], torch.tensor([[-1.0], [3.0]]))


def test_fedit_model_generates_and_evaluates():
    tokenizer = char_tokenizer()
    model = _method("fedit").build(tiny_llama(hidden=32), None, torch.Generator().manual_seed(0))
    task, _, test = load_task("arith", seed=0, num_train=8, num_test=4)
    result = evaluate_task(model, tokenizer, task, test, max_new_tokens=2)
    preds = generate_answers(model, tokenizer, list(test["prompt"]), max_new_tokens=2)  # the same greedy answers
    assert result == {"score": pytest.approx(score(task.metric, preds, list(test["answer"]))), "n": 4.0}


# --- FLoRA -----------------------------------------------------------------------------------------
def test_flora_stacking_by_hand():
    a = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    b = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [1.0]])]
    stacked_a, stacked_b = stack_lora(a, b, [1.0, 3.0])
    assert stacked_a.shape == (2, 2) and stacked_b.shape == (2, 2)  # ranks 1 + 1
    # 1/4·B1A1 + 3/4·B2A2 = 1/4·[[1,0],[2,0]] + 3/4·[[0,3],[0,1]]
    expected = torch.tensor([[0.25, 2.25], [0.5, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(stacked_b @ stacked_a, expected, rtol=0, atol=1e-15)


def test_flora_stacking_is_the_exact_weighted_sum_for_mixed_ranks():
    g = torch.Generator().manual_seed(0)
    ranks, weights = [1, 3, 2], [5.0, 1.0, 2.0]
    a = [torch.randn(r, 6, generator=g) for r in ranks]
    b = [torch.randn(4, r, generator=g) for r in ranks]
    stacked_a, stacked_b = stack_lora(a, b, weights)
    assert stacked_a.shape == (6, 6)
    expected = sum(w / 8.0 * (bk.double() @ ak.double()) for ak, bk, w in zip(a, b, weights, strict=True))
    torch.testing.assert_close(stacked_b @ stacked_a, expected, rtol=0, atol=1e-12)


def test_flora_merges_into_the_base_idempotently_and_accumulates():
    method = _method("flora", client_budgets="1,0.5")
    model = method.build(tiny_llama(), None, torch.Generator().manual_seed(0))
    layers = lora_layers(model)
    layer_name = next(iter(layers))
    w0 = layers[layer_name].get_base_layer().weight.detach().clone()
    delta = method.merged_delta(model)
    assert len(delta) == 4 and all(not v.any() for v in delta.values())  # one dense ΔW per target matrix
    delta = {k: torch.full_like(v, 0.01) for k, v in delta.items()}
    # a client gets ΔW beside the state; twice, as one process serves many clients with one model
    for _ in range(2):
        method.prepare_round(model, {}, delta, LocalTrainConfig(1e-3, budget=0.5, partition=1, server_round=2))
    torch.testing.assert_close(layers[layer_name].get_base_layer().weight, w0 + 0.01)
    fresh = lora_state(model)  # a fresh LoRA of rank 2 (β = 0.5), the same in every process
    assert all(not v[2:].any() for k, v in fresh.items() if k.endswith("lora_A.weight"))
    assert all(not v.any() for k, v in fresh.items() if k.endswith("lora_B.weight"))
    method.prepare_round(model, {}, delta, LocalTrainConfig(1e-3, budget=0.5, partition=1, server_round=2))
    assert all(torch.equal(fresh[k], v) for k, v in lora_state(model).items())
    method.prepare_round(model, {}, delta, LocalTrainConfig(1e-3, budget=0.5, partition=0, server_round=2))
    assert any(not torch.equal(fresh[k], v) for k, v in lora_state(model).items())  # another client's init

    # the server (same model here) holds ΔW = 0.01 from its last round; this round: ranks 4 and 2, weights 1 and 3
    method.server_update(1, model, delta)
    g = torch.Generator().manual_seed(1)
    updates = []
    for pid, (rank, n) in enumerate([(4, 1), (2, 3)]):
        arrays = {}
        for name, layer in layers.items():
            d_out, d_in = layer.get_base_layer().weight.shape
            arrays[name + ".lora_A.weight"] = torch.randn(rank, d_in, generator=g)
            arrays[name + ".lora_B.weight"] = torch.randn(d_out, rank, generator=g)
        updates.append(_update(pid, n, **arrays))
    merged = method.aggregate(updates)
    key_a, key_b = layer_name + ".lora_A.weight", layer_name + ".lora_B.weight"
    s = 8.0 / 4
    expected = 0.01 + s * sum(
        w / 4.0 * (u.arrays[key_b].double() @ u.arrays[key_a].double())
        for u, w in zip(updates, [1.0, 3.0], strict=True)
    )
    torch.testing.assert_close(merged[layer_name + ".flora_delta"].double(), expected, rtol=1e-6, atol=1e-6)
    assert int(merged["flora.stacked_rank"]) == 6
    state = method.get_state(model)
    assert set(state) <= set(merged) and state[key_a].shape == (4, d_in_of(layers[layer_name]))
    extras = {k: v for k, v in merged.items() if k not in state}
    update = method.server_update(2, model, extras)
    assert set(update.extras) == {k for k in merged if k.endswith(".flora_delta")}  # ΔW goes down
    assert update.log["flora_stacked_rank"] == 6
    torch.testing.assert_close(
        layers[layer_name].get_base_layer().weight, w0 + merged[layer_name + ".flora_delta"]
    )  # the server scores W0 + ΔW
    # a restarted server re-applies the ΔW of its last checkpoint
    restarted = _method("flora", client_budgets="1,0.5")
    other = restarted.build(tiny_llama(), None, torch.Generator().manual_seed(0))
    restarted.restore_extras(other, update.extras)
    torch.testing.assert_close(
        lora_layers(other)[layer_name].get_base_layer().weight, w0 + merged[layer_name + ".flora_delta"]
    )


def d_in_of(layer) -> int:
    return layer.get_base_layer().weight.shape[1]


# --- FlexLoRA --------------------------------------------------------------------------------------
def test_flexlora_svd_by_hand():
    method = _method("flexlora", lora_rank=1)
    # ΔW_1 = diag(3, 0), ΔW_2 = diag(0, 1), equal weights: mean diag(1.5, 0.5); rank 1 keeps 1.5
    updates = [
        _update(0, 2, **{A0: torch.tensor([[1.0, 0.0]]), B0: torch.tensor([[3.0], [0.0]])}),
        _update(1, 2, **{A0: torch.tensor([[0.0, 1.0]]), B0: torch.tensor([[0.0], [1.0]])}),
    ]
    merged = method.aggregate(updates)
    torch.testing.assert_close(merged[B0] @ merged[A0], torch.tensor([[1.5, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(merged[B0].abs(), merged[A0].T.abs())  # √S on both sides
    torch.testing.assert_close(float(merged["flexlora.energy_kept"]), 1.5**2 / (1.5**2 + 0.5**2))
    log = method.server_update(1, None, {"flexlora.energy_kept": merged["flexlora.energy_kept"]})
    assert log.extras == {} and log.log["flexlora_energy_kept"] == pytest.approx(0.9)


def test_flexlora_is_the_best_rank_r_approximation():
    """Eckart–Young: the aggregated factors are torch's truncated SVD, and no other rank-r pair beats them."""
    g = torch.Generator().manual_seed(0)
    rank, d_out, d_in = 3, 7, 6
    method = _method("flexlora", lora_rank=rank)
    client_ranks, examples = [3, 1, 2], [10, 30, 20]
    updates = [
        _update(i, n, **{A0: torch.randn(r, d_in, generator=g), B0: torch.randn(d_out, r, generator=g)})
        for i, (r, n) in enumerate(zip(client_ranks, examples, strict=True))
    ]
    mean = sum(n * (u.arrays[B0].double() @ u.arrays[A0].double()) for u, n in zip(updates, examples, strict=True)) / 60
    merged = method.aggregate(updates)
    assert merged[A0].shape == (rank, d_in) and merged[B0].shape == (d_out, rank)
    u, s, vh = torch.linalg.svd(mean)
    for r in (rank, 1):  # a client of rank 1 keeps the leading component: the best rank-1 approximation
        best = (u[:, :r] * s[:r]) @ vh[:r]
        ours = merged[B0][:, :r].double() @ merged[A0][:r].double()
        torch.testing.assert_close(ours, best, rtol=1e-5, atol=1e-5)
    error = torch.linalg.matrix_norm(mean - merged[B0].double() @ merged[A0].double())
    torch.testing.assert_close(error, s[rank:].pow(2).sum().sqrt())
    for trial in range(200):  # random rank-r pairs, and small perturbations of ours, all do worse
        if trial % 2:
            b, a = (
                torch.randn(d_out, rank, generator=g, dtype=torch.float64),
                torch.randn(rank, d_in, generator=g, dtype=torch.float64),
            )
        else:
            b = merged[B0].double() + 0.01 * torch.randn(d_out, rank, generator=g, dtype=torch.float64)
            a = merged[A0].double() + 0.01 * torch.randn(rank, d_in, generator=g, dtype=torch.float64)
        assert torch.linalg.matrix_norm(mean - b @ a) > error


def test_flexlora_client_trains_and_sends_its_rank():
    method = _method("flexlora", client_budgets="1,0.5")
    model = method.build(tiny_llama(), None, torch.Generator().manual_seed(0))
    full = {k: torch.randn_like(v) for k, v in lora_state(model).items()}
    method.set_state(model, full)
    method.prepare_round(model, {}, {}, LocalTrainConfig(1e-3, budget=0.5, partition=1))
    masked = lora_state(model)
    for k, v in masked.items():  # truncation: the leading 2 of 4 components, the rest zero
        kept, dropped = (v[:2], v[2:]) if "lora_A" in k else (v[:, :2], v[:, 2:])
        assert torch.equal(kept, full[k][:2] if "lora_A" in k else full[k][:, :2]) and not dropped.any()
    batch = {"input_ids": torch.randint(3, 64, (2, 6)), "labels": torch.randint(3, 64, (2, 6))}
    result = method.local_train(model, [batch, batch], LocalTrainConfig(1e-2, budget=0.5, partition=1))
    assert {tuple(v.shape)[0 if "lora_A" in k else 1] for k, v in result.state.items()} == {2}
    assert all(not v[2:].any() for k, v in lora_state(model).items() if "lora_A" in k)  # masked stays zero
    templates = method.expected_update(model, 1, {})
    assert {k: v.shape for k, v in templates.items()} == {k: v.shape for k, v in result.state.items()}


# --- HetLoRA ---------------------------------------------------------------------------------------
def test_hetlora_zero_pad_norm_weighted_by_hand():
    method = _method("hetlora", lora_rank=2)
    a_small, b_small = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])  # ΔW = [[2,0],[0,0]], norm 2
    a_full, b_full = torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.eye(2)  # ΔW = [[0,1],[1,1]], norm √3
    updates = [_update(0, 100, **{A0: a_small, B0: b_small}), _update(1, 1, **{A0: a_full, B0: b_full})]
    merged = method.aggregate(updates)
    w0, w1 = 2.0 / (2.0 + 3**0.5), 3**0.5 / (2.0 + 3**0.5)  # by norm, not by examples
    torch.testing.assert_close(merged[A0], w0 * torch.tensor([[1.0, 0.0], [0.0, 0.0]]) + w1 * a_full)
    torch.testing.assert_close(merged[B0], w0 * torch.tensor([[2.0, 0.0], [0.0, 0.0]]) + w1 * b_full)
    assert int(merged["hetlora.rank.0"]) == 1 and int(merged["hetlora.rank.1"]) == 2
    assert method.server_update(1, None, merged).log["hetlora_client_ranks"] == {"0": 1, "1": 2}


def test_hetlora_truncates_prunes_and_keeps_its_rank_privately():
    method = _method(
        "hetlora", lora_rank=4, client_budgets="0.75", method_options="prune_fraction=0.5,prune_lambda=0.5"
    )
    model = method.build(tiny_llama(), None, torch.Generator().manual_seed(0))
    full = {k: torch.randn_like(v) for k, v in lora_state(model).items()}
    method.set_state(model, full)
    method.set_private_state(model, None)
    method.prepare_round(model, {}, {}, LocalTrainConfig(1e-3, budget=0.75, partition=0))  # r_c = 3
    state = lora_state(model)
    assert all(torch.equal(v[:3], full[k][:3]) and not v[3:].any() for k, v in state.items() if "lora_A" in k)
    assert method.get_private_state(model)["hetlora.rank_and_tail_norm"].tolist() == [3.0, -1.0]
    # round 1: the tail (component 2) has no history: its norm is recorded, nothing pruned
    method._self_prune(model)
    rank, norm = method.get_private_state(model)["hetlora.rank_and_tail_norm"].tolist()
    assert rank == 3 and norm == pytest.approx(float(method.tail_norm(model).detach()))
    # next round the tail norm went down (halve the tail's B): the tail is pruned
    private = method.get_private_state(model)
    method.set_private_state(model, private)
    method.prepare_round(model, {}, {}, LocalTrainConfig(1e-3, budget=0.75, partition=0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight[:, 2] *= 0.5
    method._self_prune(model)
    assert method.get_private_state(model)["hetlora.rank_and_tail_norm"].tolist() == [2.0, -1.0]
    assert all(not v[2:].any() for k, v in lora_state(model).items() if "lora_A" in k)
    # what it sends keeps its starting rank's shape (zeros past rank 2), as the server expects
    batch = {"input_ids": torch.randint(3, 64, (2, 6)), "labels": torch.randint(3, 64, (2, 6))}
    result = method.local_train(model, [batch], LocalTrainConfig(1e-2, budget=0.75, partition=0))
    assert all(v.shape[0] == 3 and not v[2:].any() for k, v in result.state.items() if "lora_A" in k)
    assert {k: v.shape for k, v in method.expected_update(model, 0, {}).items()} == {
        k: v.shape for k, v in _truncated(lora_state(model), 3).items()
    }


def test_hetlora_options_are_validated():
    with pytest.raises(ValueError, match=r"prune_fraction=1\.5"):
        _method("hetlora", method_options="prune_fraction=1.5")
    with pytest.raises(ValueError, match="unknown_key"):
        _method("hetlora", method_options="unknown_key=1")


# --- FedSA-LoRA ------------------------------------------------------------------------------------
def test_fedsa_shares_a_only_and_keeps_b_private():
    method = _method("fedsa")
    model = method.build(tiny_llama(), None, torch.Generator().manual_seed(0))
    state = method.get_state(model)
    assert state and all(k.endswith("lora_A.weight") for k in state)
    # A is averaged by examples, by hand
    updates = [
        _update(0, 1, **{A0: torch.tensor([[2.0, 0.0]]), "eval_b." + B0: torch.tensor([[1.0], [1.0]])}),
        _update(1, 3, **{A0: torch.tensor([[6.0, 4.0]]), "eval_b." + B0: torch.tensor([[5.0], [-3.0]])}),
    ]
    merged = method.aggregate(updates)
    torch.testing.assert_close(merged[A0], torch.tensor([[5.0, 3.0]]))
    # a client: B starts at zero, is trained, kept privately, and never overwritten by the server's state
    method.set_private_state(model, None)
    assert all(not v.any() for v in method.get_private_state(model).values())
    batch = {"input_ids": torch.randint(3, 64, (2, 6)), "labels": torch.randint(3, 64, (2, 6))}
    result = method.local_train(model, [batch, batch], LocalTrainConfig(1e-2))
    assert set(result.state) == set(state)  # only A goes up as the state
    kept = method.get_private_state(model)
    assert kept and all(v.any() for v in kept.values())
    assert {k.removeprefix("eval_b.") for k in result.extras} == set(kept)  # B for the server's score only
    method.set_state(model, {k: torch.zeros_like(v) for k, v in state.items()})
    assert all(torch.equal(v, kept[k]) for k, v in method.get_private_state(model).items())
    other = {k: torch.full_like(v, 7.0) for k, v in kept.items()}  # another client in the same process
    method.set_private_state(model, other)
    assert all(torch.equal(v, other[k]) for k, v in method.get_private_state(model).items())
    # the server scores with the mean B but sends nothing beside A
    update = method.server_update(1, model, {"eval_b." + k: torch.ones_like(v) for k, v in kept.items()})
    assert update.extras == {} and all(v.eq(1).all() for v in method.get_private_state(model).values())
    assert not _method("fedsa", method_options="eval_b=none").local_train(model, [batch], LocalTrainConfig(1e-2)).extras


# --- 2-round federated runs through the run folder ------------------------------------------------
def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# tiny assets: hidden 32, q_proj 32→32, v_proj 32→16 (2 of 4 heads), 2 layers; float32
A_BYTES_PER_RANK = 2 * (32 + 32) * 4
B_BYTES_PER_RANK = 2 * (32 + 16) * 4
DENSE_BYTES = 2 * (32 * 32 + 16 * 32) * 4
RANKS = {0: 4, 1: 2, 2: 4}  # lora_rank 4, client_budgets "1,0.5" cycled over 3 clients


@pytest.mark.parametrize(
    "method",
    [
        "fedit",  # on Flower's simulation engine (Ray); the others in-process, same ServerApp and ClientApp
        "fedsa",
        "flexlora",
        "flora",
        "hetlora",
    ],
)
def test_two_round_run(run_assets, tmp_path, method):
    """Each baseline through Flower's simulation and the run folder, with heterogeneous budgets."""
    out = tmp_path / method
    config = tiny_run_config(run_assets, out, method, client_budgets="1,0.5")
    if method == "fedit":
        run_simulation(config, progress=False)
    else:
        run_in_process(config)
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    hetero = method in ("flexlora", "flora", "hetlora")  # fedit and fedsa have one rank for all
    for row in rows:
        assert row["clients_replied"] == 2 and row["eval_n"] == 4
        ranks = [RANKS[c] if hetero else 4 for c in row["clients"]]
        up_a, up_b = sum(ranks) * A_BYTES_PER_RANK, sum(ranks) * B_BYTES_PER_RANK
        if method == "fedsa":  # A up as the state; B up only for the server's score
            assert (row["bytes_up_state"], row["bytes_up_extras"]) == (up_a, up_b)
            assert row["bytes_down_per_client"] == 4 * A_BYTES_PER_RANK
        else:
            assert (row["bytes_up_state"], row["bytes_up_extras"]) == (up_a + up_b, 0)
            down = 4 * (A_BYTES_PER_RANK + B_BYTES_PER_RANK)  # the global rank-4 factors
            if method == "flora" and row["round"] > 1:
                down += DENSE_BYTES  # FLoRA: the merged ΔW beside them
            assert row["bytes_down_per_client"] == down
        if method == "flora":
            assert row["flora_stacked_rank"] == sum(ranks)
        if method == "flexlora":
            # the mean ΔW has rank up to sum(ranks) (6 or 8) > 4: rank 4 loses some of its energy but keeps at
            # least 4 / sum(ranks) of it (the top 4 of sum(ranks) squared singular values, Eckart–Young)
            assert 4 / sum(ranks) <= row["flexlora_energy_kept"] < 1
        if method == "hetlora":
            assert {int(k): v for k, v in row["hetlora_client_ranks"].items()} == {
                c: RANKS[c] for c in row["clients"]
            }  # 2 rounds: a tail needs a history before it can be pruned
    final = load_file(out / "checkpoints" / "round_0002.safetensors")
    assert final and all(v.isfinite().all() for v in final.values())
    if method == "flora":
        deltas = {k: v for k, v in final.items() if k.endswith(".flora_delta")}
        assert len(deltas) == 4 and all(v.any() for v in deltas.values())  # merged updates, checkpointed
    else:
        assert any(v.any() for k, v in final.items() if "lora_B" in k) or method == "fedsa"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["rounds"] == 2
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
