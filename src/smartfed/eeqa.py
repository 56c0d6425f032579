"""EEQA: Elastic Expert Quota Allocation (SmartFed, Wu et al., 2025; docs/design.md §4).

Every target matrix t of a MoRE model keeps its top K_t rank-one experts per
token; K_t is the matrix's *quota*. EEQA moves a fixed expert budget
K_total = Σ_t K_t across matrices according to measured expert importances
I_m (per expert m of matrix t), so that computing goes where experts matter.

Allocation problem, with f_t(k) the sum of the k largest importances of t:

    max Σ_t f_t(K_t)   s.t.   Σ_t K_t = budget,   lo_t ≤ K_t ≤ hi_t,
    lo_t = k_min,   hi_t = min(k_max or M_t, M_t),   M_t = number of experts of t.

``allocate_quotas`` implements the two phases of docs/design.md §4 (proportional to
I_t = Σ_m I_m, then a greedy residual) and, as ``mode="greedy"``, the pure
greedy from the lower bounds. Each f_t is concave (prefix sums of a descending
sequence), so the pure greedy is exact; ``optimal_quotas`` solves the same
problem independently by dynamic programming, and every ``Allocation`` reports
its gap to that optimum. ``client_budget`` gives the A³SMoE-style per-client
budget ⌊β·K_total⌋.

numpy only: importances may be lists, numpy arrays or torch tensors (any device,
any dtype); they are read once as float64.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, get_args

import numpy as np

Mode = Literal["two_phase", "greedy"]

__all__ = [
    "Allocation",
    "allocate_quotas",
    "client_budget",
    "matrix_importance",
    "optimal_quotas",
]


@dataclass(frozen=True)
class Allocation:
    """Quotas chosen by EEQA, their objective and the exact optimum of the same problem."""

    quotas: dict[str, int]  # K_t per matrix, same key order as the input
    objective: float  # Σ_t sum of the top-K_t expert importances of t
    optimum: float  # exact optimum of the same problem (``optimal_quotas``)

    @property
    def gap(self) -> float:
        """optimum − objective, ≥ 0 (sub-ulp negative rounding noise is reported as 0)."""
        return max(0.0, self.optimum - self.objective)


# --------------------------------------------------------------------------- inputs


def _to_array(name: str, values: Any) -> np.ndarray:
    """1-D float64 copy of one matrix's expert importances, validated."""
    if hasattr(values, "detach"):  # torch tensor: leave autograd and the GPU first
        values = values.detach().cpu()
        if hasattr(values, "double"):  # bfloat16 has no numpy dtype; float64 is exact for it
            values = values.double()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"importances of matrix {name!r} are not numeric: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"importances of matrix {name!r} must be 1-D (one per expert), got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"importances of matrix {name!r} must be finite and non-negative; expert {i} has {float(arr[i])!r}"
        )
    return arr


def _read(expert_importance: Mapping[str, Any]) -> tuple[list[str], list[np.ndarray]]:
    """Keys in input order and each matrix's importances sorted in descending order."""
    if not isinstance(expert_importance, Mapping):
        raise TypeError(f"expert_importance must be a mapping matrix -> importances, got {type(expert_importance)}")
    if len(expert_importance) == 0:
        raise ValueError("expert_importance is empty: there is no matrix to allocate experts to")
    names = list(expert_importance)
    # Descending order: the quota K_t keeps the K_t most important experts, so
    # index K_t is the next expert to gain and index K_t - 1 the last one kept.
    ranked = [np.sort(_to_array(n, expert_importance[n]))[::-1] for n in names]
    return names, ranked


def _as_int(what: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None


def _bounds(
    names: list[str], ranked: list[np.ndarray], budget: int, k_min: int, k_max: int | None
) -> tuple[list[int], list[int]]:
    """Per-matrix bounds lo_t = k_min, hi_t = min(k_max or M_t, M_t); checks feasibility."""
    if k_min < 0:
        raise ValueError(f"k_min={k_min} must be >= 0")
    if k_max is not None and k_max < k_min:
        raise ValueError(f"k_max={k_max} is smaller than k_min={k_min}")
    lo, hi = [], []
    for name, r in zip(names, ranked, strict=True):
        m = len(r)
        h = m if k_max is None else min(k_max, m)
        if k_min > h:
            raise ValueError(
                f"matrix {name!r} has {m} experts, upper bound {h} < k_min={k_min}: no feasible quota for it"
            )
        lo.append(k_min)
        hi.append(h)
    lo_sum, hi_sum = sum(lo), sum(hi)
    if not lo_sum <= budget <= hi_sum:
        raise ValueError(
            f"budget={budget} is infeasible: quotas must sum to it with Σ lo_t = {lo_sum} "
            f"(k_min={k_min} × {len(names)} matrices) and Σ hi_t = {hi_sum} (k_max={k_max}, capped at M_t)"
        )
    return lo, hi


def _objective(ranked: list[np.ndarray], quotas: list[int]) -> float:
    # fsum is the correctly rounded sum of all kept importances, independent of order,
    # so two allocations that keep the same experts score exactly the same.
    kept = [r[:k] for r, k in zip(ranked, quotas, strict=True) if k > 0]
    return math.fsum(np.concatenate(kept)) if kept else 0.0


# --------------------------------------------------------------------------- public API


def matrix_importance(expert_importance: Mapping[str, Any]) -> dict[str, float]:
    """Per-matrix importance I_t = Σ_m I_m (docs/design.md §4), same key order as the input."""
    names, ranked = _read(expert_importance)
    return {n: math.fsum(r) for n, r in zip(names, ranked, strict=True)}


def client_budget(total: int, beta: float) -> int:
    """A³SMoE-style budget of a client with capacity β ∈ (0, 1]: ⌊β·total⌋.

    β is read through its shortest decimal form, so ``client_budget(100, 0.29)``
    is 29 and not 28 (0.29·100 is 28.999… in binary floating point).
    """
    total = _as_int("total", total)
    if total < 0:
        raise ValueError(f"total={total} must be >= 0")
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta={beta!r} must be a number in (0, 1]") from None
    if not (math.isfinite(b) and 0.0 < b <= 1.0):
        raise ValueError(f"beta={beta!r} must be in (0, 1]")
    return math.floor(Fraction(repr(b)) * total)


def allocate_quotas(
    expert_importance: Mapping[str, Any],
    budget: int,
    *,
    k_min: int = 1,
    k_max: int | None = None,
    mode: Mode = "two_phase",
) -> Allocation:
    """Distribute ``budget`` expert slots over matrices by importance (EEQA, docs/design.md §4).

    ``two_phase``: K_t = clip(⌊budget·I_t/ΣI⌋, lo_t, hi_t) (an even split when ΣI = 0),
    then the greedy residual below brings Σ K_t to exactly ``budget``.
    ``greedy``: start from K_t = lo_t and run the greedy residual only (exact optimum).

    Greedy residual: while short, give a slot to the matrix whose next best expert
    is largest; while over (clipping up to lo_t can overshoot), take one from the
    matrix whose last kept expert is smallest. Ties go to the earlier key.
    """
    if mode not in get_args(Mode):
        raise ValueError(f"mode={mode!r} is not one of {list(get_args(Mode))}")
    names, ranked = _read(expert_importance)
    budget = _as_int("budget", budget)
    k_min = _as_int("k_min", k_min)
    k_max = None if k_max is None else _as_int("k_max", k_max)
    lo, hi = _bounds(names, ranked, budget, k_min, k_max)
    n = len(names)

    if mode == "greedy":
        quotas = list(lo)
    else:
        totals = [math.fsum(r) for r in ranked]
        total = math.fsum(totals)
        # ΣI = 0 (nothing measured yet): no reason to favour any matrix, split evenly.
        raw = [math.floor(budget * it / total) for it in totals] if total > 0 else [budget // n] * n
        quotas = [min(max(q, a), b) for q, a, b in zip(raw, lo, hi, strict=True)]

    _greedy_residual(ranked, quotas, lo, hi, budget)
    # The DP is independent of the greedy, so the reported gap is a real check.
    _, optimum = _optimal(ranked, lo, hi, budget)
    return Allocation(
        quotas=dict(zip(names, quotas, strict=True)),
        objective=_objective(ranked, quotas),
        optimum=optimum,
    )


def _greedy_residual(ranked: list[np.ndarray], quotas: list[int], lo: list[int], hi: list[int], budget: int) -> None:
    """Move ``quotas`` (in place) to sum exactly to ``budget``, one best slot at a time.

    A heap of one candidate per matrix makes it O((T + residual)·log T) instead of
    rescanning all T matrices for each of the residual slots. The tuple's second
    entry, the key index, breaks ties in favour of the earlier key.
    """
    excess = sum(quotas) - budget
    if excess < 0:
        heap = [(-float(r[k]), i) for i, (r, k) in enumerate(zip(ranked, quotas, strict=True)) if k < hi[i]]
        heapq.heapify(heap)
        for _ in range(-excess):
            _, i = heapq.heappop(heap)  # never empty: budget <= Σ hi_t was checked
            quotas[i] += 1
            if quotas[i] < hi[i]:
                heapq.heappush(heap, (-float(ranked[i][quotas[i]]), i))
    elif excess > 0:
        heap = [(float(r[k - 1]), i) for i, (r, k) in enumerate(zip(ranked, quotas, strict=True)) if k > lo[i]]
        heapq.heapify(heap)
        for _ in range(excess):
            _, i = heapq.heappop(heap)  # never empty: budget >= Σ lo_t was checked
            quotas[i] -= 1
            if quotas[i] > lo[i]:
                heapq.heappush(heap, (float(ranked[i][quotas[i] - 1]), i))


def optimal_quotas(
    expert_importance: Mapping[str, Any],
    budget: int,
    *,
    k_min: int = 1,
    k_max: int | None = None,
) -> tuple[dict[str, int], float]:
    """Exact optimum of the allocation problem by dynamic programming over matrices.

    Returns the argmax quotas (same key order as the input) and their objective
    Σ_t f_t(K_t). Does not rely on the concavity of f_t, so it checks the greedy.
    """
    names, ranked = _read(expert_importance)
    budget = _as_int("budget", budget)
    k_min = _as_int("k_min", k_min)
    k_max = None if k_max is None else _as_int("k_max", k_max)
    lo, hi = _bounds(names, ranked, budget, k_min, k_max)
    quotas, value = _optimal(ranked, lo, hi, budget)
    return dict(zip(names, quotas, strict=True)), value


def _optimal(ranked: list[np.ndarray], lo: list[int], hi: list[int], budget: int) -> tuple[list[int], float]:
    """DP: V_t(b) = max_k V_{t-1}(b - k) + f_t(k), lo_t ≤ k ≤ hi_t, then backtrack from V_T(budget).

    Only totals b that can still be completed to exactly ``budget`` by the remaining
    matrices are kept (a window [start, stop] per stage); the last stage is a single
    entry. The max over k is a loop of in-place vector operations over b, about
    (hi_t − lo_t + 1) numpy calls per matrix. Storing V_t per stage (not an argmax
    table) keeps the forward pass to two calls per k; the backtrack recomputes the
    argmax of one b per stage from identical float operations.
    """
    n = len(ranked)
    prefix = [np.concatenate(([0.0], np.cumsum(r))) for r in ranked]  # f_t(k), k = 0..M_t
    lo_rest = np.concatenate((np.cumsum(lo[::-1])[::-1], [0])).tolist()  # Σ_{s ≥ t} lo_s
    hi_rest = np.concatenate((np.cumsum(hi[::-1])[::-1], [0])).tolist()

    stages: list[tuple[int, np.ndarray]] = [(0, np.zeros(1))]  # V_0: total 0, value 0
    buf = np.empty(budget + 1)
    reach_lo = reach_hi = 0  # Σ lo and Σ hi of the matrices seen so far
    for t in range(n):
        prev_start, prev = stages[-1]
        prev_stop = prev_start + len(prev) - 1
        reach_lo, reach_hi = reach_lo + lo[t], reach_hi + hi[t]
        start = max(reach_lo, budget - hi_rest[t + 1])
        stop = min(reach_hi, budget - lo_rest[t + 1])
        cur = np.full(stop - start + 1, -np.inf)
        f = prefix[t]
        for k in range(lo[t], hi[t] + 1):
            b0, b1 = max(start, prev_start + k), min(stop, prev_stop + k)
            if b0 > b1:
                continue
            w = b1 - b0 + 1
            src = prev[b0 - k - prev_start : b1 - k - prev_start + 1]
            np.add(src, f[k], out=buf[:w])
            dst = cur[b0 - start : b1 - start + 1]
            np.maximum(dst, buf[:w], out=dst)
        stages.append((start, cur))

    quotas = [0] * n
    b = budget
    for t in range(n - 1, -1, -1):
        prev_start, prev = stages[t]
        ks = np.arange(lo[t], hi[t] + 1)
        idx = b - ks - prev_start
        ok = (idx >= 0) & (idx < len(prev))
        cand = np.where(ok, prev[np.clip(idx, 0, len(prev) - 1)] + prefix[t][ks], -np.inf)
        k = int(ks[int(np.argmax(cand))])
        quotas[t] = k
        b -= k
    assert b == 0, "DP backtrack did not land on total 0"
    return quotas, _objective(ranked, quotas)
