"""EEQA quota allocation (DESIGN.md §2): hand-computed cases, properties, brute force, errors."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartfed.eeqa import Allocation, allocate_quotas, client_budget, matrix_importance, optimal_quotas

TOL = 1e-9


def top_sum(values, k: int) -> float:
    return math.fsum(sorted(values, reverse=True)[:k])


def objective_of(importances: dict[str, list[float]], quotas: dict[str, int]) -> float:
    return math.fsum(top_sum(v, quotas[n]) for n, v in importances.items())


def brute_force(importances: dict[str, list[float]], budget: int, k_min: int, k_max: int | None) -> float:
    ranges = [range(k_min, min(len(v) if k_max is None else k_max, len(v)) + 1) for v in importances.values()]
    best = -math.inf
    for ks in itertools.product(*ranges):
        if sum(ks) == budget:
            best = max(best, objective_of(importances, dict(zip(importances, ks, strict=True))))
    return best


@st.composite
def problems(draw, max_matrices: int = 8, max_experts: int = 12):
    """Random importances, feasible bounds and a feasible budget."""
    n = draw(st.integers(1, max_matrices))
    # Few distinct values on purpose: ties exercise the deterministic tie-breaking.
    value = st.one_of(
        st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, 1.0, 2.0, 0.5]),
    )
    importances = {f"m{i}": draw(st.lists(value, min_size=1, max_size=max_experts)) for i in range(n)}
    sizes = [len(v) for v in importances.values()]
    k_min = draw(st.integers(0, min(sizes)))
    k_max = draw(st.one_of(st.none(), st.integers(k_min, max(sizes))))
    lo = k_min * n
    hi = sum(m if k_max is None else min(k_max, m) for m in sizes)
    budget = draw(st.integers(lo, hi))
    return importances, budget, k_min, k_max


# --------------------------------------------------------------------------- hand-computed


def test_hand_example_two_phase():
    # I_a = 6, I_b = 7, I_c = 0.1, ΣI = 13.1, budget 3, k_min 1:
    #   proportional: a ⌊3·6/13.1⌋ = ⌊1.37⌋ = 1, b ⌊3·7/13.1⌋ = ⌊1.60⌋ = 1, c ⌊0.02⌋ = 0 → clipped up to 1.
    #   Σ = 3 = budget, no residual. Kept: 5 + 4 + 0.1 = 9.1, the only feasible allocation.
    imp = {"a": [5, 1], "b": [4, 3], "c": [0.1]}
    alloc = allocate_quotas(imp, 3, k_min=1)
    assert isinstance(alloc, Allocation)
    assert alloc.quotas == {"a": 1, "b": 1, "c": 1}
    assert list(alloc.quotas) == ["a", "b", "c"]
    assert alloc.objective == pytest.approx(9.1, abs=TOL)
    assert alloc.optimum == pytest.approx(9.1, abs=TOL)
    assert alloc.gap == 0.0
    # budget 4: a ⌊1.83⌋ = 1, b ⌊2.14⌋ = 2, c 0 → 1; Σ = 4. Kept 5 + (4 + 3) + 0.1 = 12.1 (optimal:
    # the other choice, a = 2, keeps 5 + 1 + 4 + 0.1 = 10.1).
    alloc = allocate_quotas(imp, 4, k_min=1)
    assert alloc.quotas == {"a": 1, "b": 2, "c": 1}
    assert alloc.objective == pytest.approx(12.1, abs=TOL)
    assert alloc.gap == pytest.approx(0.0, abs=TOL)


def test_hand_example_residual_goes_to_best_next_expert():
    # k_min 0, budget 3: proportional a 1, b 1, c 0 (Σ = 2). One residual slot; next best experts
    # a[1] = 1, b[1] = 3, c[0] = 0.1 → b. Kept 5 + 4 + 3 = 12, the three largest importances.
    alloc = allocate_quotas({"a": [5, 1], "b": [4, 3], "c": [0.1]}, 3, k_min=0)
    assert alloc.quotas == {"a": 1, "b": 2, "c": 0}
    assert alloc.objective == pytest.approx(12.0, abs=TOL)
    assert alloc.gap == pytest.approx(0.0, abs=TOL)


def test_hand_example_overshoot_takes_back_weakest_last_expert():
    # ΣI = 8 + 7 + 0.1 + 0.1 = 15.2, budget 5, k_min 1: a ⌊2.63⌋ = 2, b ⌊2.30⌋ = 2, c, d 0 → 1: Σ = 6 > 5.
    # Take one slot back: last kept a[1] = 1 < b[1] = 2 → a drops to 1. Kept 5 + 3 + 2 + 0.1 + 0.1 = 10.2.
    imp = {"a": [5, 1, 1, 1], "b": [3, 2, 2], "c": [0.1], "d": [0.1]}
    alloc = allocate_quotas(imp, 5, k_min=1)
    assert alloc.quotas == {"a": 1, "b": 2, "c": 1, "d": 1}
    assert alloc.objective == pytest.approx(10.2, abs=TOL)
    assert alloc.gap == pytest.approx(0.0, abs=TOL)


def test_two_phase_gap_is_reported_and_greedy_closes_it():
    # ΣI = 6 + 4 = 10, budget 5, k_min 0: proportional a ⌊3⌋ = 3, b ⌊2⌋ = 2 → keeps 1+1+1 + 4+0 = 7.
    # The optimum keeps b's 4 and four of a's ones: 8. Greedy from 0: b[0] = 4 first, then a → (4, 1).
    imp = {"a": [1, 1, 1, 1, 1, 1], "b": [4, 0, 0]}
    two = allocate_quotas(imp, 5, k_min=0)
    assert two.quotas == {"a": 3, "b": 2}
    assert two.objective == pytest.approx(7.0)
    assert two.optimum == pytest.approx(8.0)
    assert two.gap == pytest.approx(1.0)
    greedy = allocate_quotas(imp, 5, k_min=0, mode="greedy")
    assert greedy.quotas == {"a": 4, "b": 1}
    assert greedy.gap == 0.0
    assert optimal_quotas(imp, 5, k_min=0) == ({"a": 4, "b": 1}, pytest.approx(8.0))


def test_proportional_phase_favours_the_more_important_matrix():
    # Same number of experts, equal importances inside each matrix, so the greedy residual
    # cannot create the difference: a (I = 10) gets ⌊12·10/12⌋ = 10 slots, b (I = 2) gets 2.
    imp = {"a": [1.0] * 10, "b": [0.2] * 10}
    alloc = allocate_quotas(imp, 12, k_min=1)
    assert alloc.quotas == {"a": 10, "b": 2}
    # Reversed key order and scaled importances: the larger total still wins.
    alloc = allocate_quotas({"b": [0.3] * 16, "a": [3.0] * 16}, 16, k_min=1)
    assert alloc.quotas["a"] > alloc.quotas["b"]


def test_zero_importance_spreads_evenly():
    imp = {"a": [0, 0, 0, 0], "b": [0, 0, 0, 0], "c": [0, 0, 0, 0]}
    alloc = allocate_quotas(imp, 7, k_min=1)
    # ⌊7/3⌋ = 2 each, one residual slot: all next experts are 0, the tie goes to the first key.
    assert alloc.quotas == {"a": 3, "b": 2, "c": 2}
    assert alloc.objective == 0.0 and alloc.gap == 0.0


def test_ties_break_by_key_order():
    # Every next expert is worth 1, so every step is a tie and goes to the first key with room.
    alloc = allocate_quotas({"x": [1, 1], "y": [1, 1], "z": [1, 1]}, 3, k_min=0, mode="greedy")
    assert alloc.quotas == {"x": 2, "y": 1, "z": 0}
    # Taking back (clip up to k_min overshoots): equal last kept experts, the first key gives.
    alloc = allocate_quotas({"x": [5, 1, 1], "y": [5, 1, 1], "z": [0.0]}, 4, k_min=1)
    assert alloc.quotas == {"x": 1, "y": 2, "z": 1}


def test_k_max_caps_quotas():
    imp = {"a": [9, 8, 7, 6], "b": [1, 1, 1, 1]}
    alloc = allocate_quotas(imp, 5, k_min=1, k_max=3)
    assert alloc.quotas == {"a": 3, "b": 2}
    assert optimal_quotas(imp, 5, k_min=1, k_max=3)[0] == {"a": 3, "b": 2}


def test_matrix_importance_and_array_inputs():
    assert matrix_importance({"a": [5, 1], "b": np.array([4.0, 3.0]), "c": (0.1,)}) == {
        "a": 6.0,
        "b": 7.0,
        "c": 0.1,
    }
    torch = pytest.importorskip("torch")
    imp = {"a": torch.tensor([5.0, 1.0], requires_grad=True), "b": torch.tensor([4.0, 3.0], dtype=torch.bfloat16)}
    assert matrix_importance(imp) == {"a": 6.0, "b": 7.0}
    assert allocate_quotas(imp, 3, k_min=1).quotas == {"a": 1, "b": 2}


def test_client_budget():
    assert client_budget(64, 0.5) == 32
    assert client_budget(64, 1.0) == 64
    assert client_budget(10, 0.05) == 0
    assert client_budget(100, 0.29) == 29  # not 28: 0.29·100 is 28.999… in binary floating point
    assert client_budget(7, 0.5) == 3


@pytest.mark.parametrize("beta", [0.0, -0.25, 1.5, float("nan"), float("inf")])
def test_client_budget_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match=re.escape(f"beta={beta!r}")):
        client_budget(64, beta)


def test_large_case_greedy_matches_dp():
    rng = np.random.default_rng(0)
    imp = {f"layer{t}.q_proj": rng.exponential(size=int(rng.integers(8, 65))) * rng.uniform(0.1, 5) for t in range(60)}
    greedy = allocate_quotas(imp, 1000, k_min=2, k_max=48, mode="greedy")
    two = allocate_quotas(imp, 1000, k_min=2, k_max=48)
    assert sum(greedy.quotas.values()) == sum(two.quotas.values()) == 1000
    assert greedy.gap == pytest.approx(0.0, abs=TOL)
    assert greedy.optimum == two.optimum
    assert two.objective <= two.optimum + TOL


# --------------------------------------------------------------------------- errors


def test_infeasible_budget_names_budget_and_bounds():
    imp = {"a": [1, 2], "b": [3]}
    with pytest.raises(ValueError, match=r"budget=1\b.*Σ lo_t = 2.*Σ hi_t = 3"):
        allocate_quotas(imp, 1, k_min=1)
    with pytest.raises(ValueError, match=r"budget=4\b.*Σ hi_t = 3"):
        optimal_quotas(imp, 4, k_min=1)
    with pytest.raises(ValueError, match=r"budget=5\b.*Σ hi_t = 2"):
        allocate_quotas(imp, 5, k_min=0, k_max=1, mode="greedy")


def test_k_min_above_matrix_size_names_matrix():
    with pytest.raises(ValueError, match=r"'b'.*k_min=2"):
        allocate_quotas({"a": [1, 2, 3], "b": [3]}, 4, k_min=2)
    with pytest.raises(ValueError, match=r"k_max=1.*k_min=2"):
        allocate_quotas({"a": [1, 2, 3]}, 2, k_min=2, k_max=1)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_importance_names_matrix_and_value(bad):
    imp = {"a": [1.0, 2.0], "layers.3.v_proj": [0.5, bad]}
    for call in (
        lambda: allocate_quotas(imp, 2),
        lambda: optimal_quotas(imp, 2),
        lambda: matrix_importance(imp),
    ):
        with pytest.raises(ValueError, match=rf"'layers\.3\.v_proj'.*{re.escape(repr(bad))}"):
            call()


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        allocate_quotas({}, 0)
    with pytest.raises(ValueError, match="empty"):
        optimal_quotas({}, 0)
    with pytest.raises(ValueError, match="1-D"):
        allocate_quotas({"a": [[1.0, 2.0]]}, 1)
    with pytest.raises(ValueError, match="mode='best'"):
        allocate_quotas({"a": [1.0]}, 1, mode="best")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(["two_phase", "greedy"]))
def test_allocation_properties(problem, mode):
    importances, budget, k_min, k_max = problem
    alloc = allocate_quotas(importances, budget, k_min=k_min, k_max=k_max, mode=mode)
    assert list(alloc.quotas) == list(importances)
    assert sum(alloc.quotas.values()) == budget
    for name, k in alloc.quotas.items():
        m = len(importances[name])
        assert k_min <= k <= (m if k_max is None else min(k_max, m))
    assert alloc.objective == pytest.approx(objective_of(importances, alloc.quotas), abs=TOL)
    assert alloc.objective <= alloc.optimum + TOL
    # the logged optimum is the exact one (optimal_quotas is checked against brute force below) and the gap is the
    # distance of these quotas to it, not a clipped or sign-swapped difference
    assert alloc.optimum == pytest.approx(optimal_quotas(importances, budget, k_min=k_min, k_max=k_max)[1], abs=TOL)
    assert alloc.gap == pytest.approx(alloc.optimum - objective_of(importances, alloc.quotas), abs=TOL)
    if mode == "greedy":  # f_t concave → greedy is exact
        assert alloc.objective == pytest.approx(alloc.optimum, abs=TOL)
    # Deterministic: same input, same answer.
    assert allocate_quotas(importances, budget, k_min=k_min, k_max=k_max, mode=mode) == alloc


@settings(max_examples=150, deadline=None)
@given(problems(max_matrices=4, max_experts=5))
def test_optimal_quotas_matches_brute_force(problem):
    importances, budget, k_min, k_max = problem
    quotas, value = optimal_quotas(importances, budget, k_min=k_min, k_max=k_max)
    assert sum(quotas.values()) == budget
    assert value == pytest.approx(objective_of(importances, quotas), abs=TOL)
    assert value == pytest.approx(brute_force(importances, budget, k_min, k_max), abs=TOL)
