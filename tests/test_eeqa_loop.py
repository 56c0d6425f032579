"""EEQA over rounds on a real (tiny) MoRE model: importance from the layers' statistics, quotas fed back.

The first importance weighted each expert by its kept gate, so an expert that is
never kept scored 0 and a matrix's importance grew with its own quota (a matrix
pushed to k_min could never come back). Scoring every expert, kept or not, breaks
that loop: these tests plant per-matrix contributions and follow the quotas.
"""

from __future__ import annotations

import pytest
import torch

from smartfed import LoraPool, MoreConfig, attach_more
from smartfed.eeqa import allocate_quotas, optimal_quotas
from smartfed.methods import get_method_class, load_builtin_methods
from smartfed.run.config import RunConfig

from .conftest import make_adapter, run_in_process, tiny_llama, tiny_run_config

K = 3  # per matrix at the start; 4 matrices of M = 8 experts: the budget is 12


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> LoraPool:
    root = tmp_path_factory.mktemp("eeqa_pool")
    base = tiny_llama()
    return LoraPool.load([make_adapter(base, root / "a", r=4, seed=1), make_adapter(base, root / "b", r=4, seed=2)])


def _model(pool: LoraPool, factors: list[float]):
    """A MoRE model whose matrix t's experts contribute ``factors[t]`` times what they do by nature.

    Planted through ``expert_norm`` (‖s_m B_m‖, which only the statistics read), so routing and
    outputs are untouched and the planted factor is exactly the contribution's.
    """
    model = attach_more(tiny_llama(), pool, MoreConfig(top_k=K), generator=torch.Generator().manual_seed(0))
    for layer, factor in zip(model.more_layers().values(), factors, strict=True):
        layer.expert_norm.fill_(factor)  # every expert of the matrix equally strong: the contribution is |A_m x|·f
    return model


def _rounds(model, importance: str, rounds: int, plant: dict[int, list[float]] | None = None) -> list[dict]:
    """EEQA each round from the importance of one forward pass; returns the quotas and allocations."""
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    budget = K * len(model.more_layers())
    history = []
    for r in range(rounds):
        for t, factor in enumerate((plant or {}).get(r, [])):
            list(model.more_layers().values())[t].expert_norm.fill_(factor)
        with torch.no_grad(), model.tracking_expert_stats():
            model(ids)
        scores = {name: s[importance] for name, s in model.expert_stats().items()}
        allocation = allocate_quotas(scores, budget, k_min=1)
        model.set_quotas(allocation.quotas)
        history.append({"quotas": list(allocation.quotas.values()), "allocation": allocation, "scores": scores})
    return history


def test_allocation_is_within_its_logged_gap_of_the_exact_optimum_and_stable_over_rounds(pool):
    model = _model(pool, [1.0, 2.0, 0.5, 1.0])
    history = _rounds(model, "prob_contribution", rounds=5)
    for step in history:
        a = step["allocation"]
        _, optimum = optimal_quotas(step["scores"], sum(step["quotas"]), k_min=1)
        assert a.optimum == pytest.approx(optimum, rel=1e-12)  # the logged optimum is the exact one
        assert a.objective + a.gap == pytest.approx(optimum, rel=1e-12)  # and the logged gap is the distance
        assert a.gap <= 0.05 * optimum  # two-phase: proportional, then greedy; within 5 % here
    # the importance does not depend on the quota, so the quotas settle at once and stay
    assert all(step["quotas"] == history[1]["quotas"] for step in history[1:])
    assert history[-1]["quotas"][1] == max(history[-1]["quotas"])  # the strongest matrix has the most


@pytest.mark.parametrize(
    ("importance", "feeds_on_quota"),
    [("prob_contribution", False), ("contribution", False), ("gated_contribution", True)],
)
def test_importance_does_not_depend_on_the_quota_it_sets(pool, importance, feeds_on_quota):
    """The same tokens and router under two quota vectors: the default importances do not move at all."""
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    model = _model(pool, [1.0] * 4)
    scores = []
    for quotas in ([K] * 4, [1, 8, 1, 2]):
        model.set_quotas(dict(zip(model.more_layers(), quotas, strict=True)))
        with torch.no_grad(), model.tracking_expert_stats():
            model(ids)
        scores.append({name: s[importance] for name, s in model.expert_stats().items()})
    # layer 0's matrices only: the quotas of layer 0 change what layer 1 sees, and so its importance
    layer0 = [n for n in scores[0] if n.startswith("model.layers.0.")]
    moved = [not torch.equal(scores[0][n], scores[1][n]) for n in layer0]
    assert len(layer0) == 2
    if feeds_on_quota:
        # the old importance: fewer kept experts, less importance -> fewer experts next round
        first = next(iter(scores[0]))
        assert all(moved) and float(scores[1][first].sum()) < float(scores[0][first].sum())
    else:
        assert not any(moved)


@pytest.mark.parametrize("importance", ["prob_contribution", "contribution"])
def test_a_matrix_at_k_min_regains_quota_when_its_experts_matter_more(pool, importance):
    weak_then_strong = {0: [1.0, 2.0, 0.01, 1.0], 3: [1.0, 2.0, 20.0, 1.0]}
    history = _rounds(_model(pool, [1.0] * 4), importance, rounds=6, plant=weak_then_strong)
    assert history[2]["quotas"][2] == 1  # the weak matrix went down to k_min
    assert history[-1]["quotas"][2] > K  # and came back once its experts contributed most


def test_client_budget_too_small_for_k_min_is_an_error_at_start(pool):
    load_builtin_methods()
    config = RunConfig(
        model_name_or_path="x", lora_pool="y", method="smartfed", topk_experts=K, client_budgets="1,0.05"
    )
    method = get_method_class("smartfed")(config)
    with pytest.raises(
        ValueError, match=r"--client_budgets: β=0\.05 keeps 0 of K_total=12 .* smallest β that fits is 0\.34"
    ):
        method.build(tiny_llama(), pool, torch.Generator().manual_seed(0))
    fits = get_method_class("smartfed")(RunConfig(**{**config.to_dict(), "client_budgets": "1,0.34"}))
    fits.build(tiny_llama(), pool, torch.Generator().manual_seed(0))  # ⌊0.34·12⌋ = 4 = one per matrix


def test_eeqa_period_two_reallocates_every_other_round(run_assets, tmp_path):
    import json

    config = tiny_run_config(
        run_assets, tmp_path / "run", "smartfed", num_rounds=4, topk_experts=2, enable_eeqa=True, eeqa_period=2
    )
    run_in_process(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("eeqa_gap" in r) for r in rows] == [False, True, False, True]
    assert rows[0]["quotas"] == {name: 2 for name in rows[0]["quotas"]}  # round 1: the uniform start
    assert rows[2]["quotas"] == rows[1]["quotas"]  # round 3 keeps round 2's allocation
    assert all(sum(r["quotas"].values()) == 2 * len(r["quotas"]) for r in rows)
