"""Server-side combination of client arrays: FedAvg's weighted mean and Byzantine-robust rules.

A ``Combine`` maps the clients' ``{name: tensor}`` dicts and their weights to one
dict. ``Method.aggregate`` calls the combine chosen by ``--aggregation``:

- ``weighted_mean``: FedAvg (McMahan et al., 2017), the default.
- ``coordinate_median``: the coordinate-wise median (Yin et al., 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates"); unweighted.
- ``trimmed_mean(beta)``: per coordinate, drop the ⌊β·n⌋ largest and smallest values and
  average the rest (same paper); unweighted, since a weight is a client's own claim.
- ``norm_clipped(combine, reference, max_norm)``: scale each client's delta from the
  current global state to L2 norm ≤ ``max_norm`` before combining (Sun et al., 2019,
  "Can You Really Backdoor Federated Learning?").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

# (per-client {name: tensor}, per-client weight) -> {name: combined tensor}
Combine = Callable[[Sequence[dict[str, torch.Tensor]], Sequence[float]], dict[str, torch.Tensor]]


def _check(arrays: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> None:
    if not arrays:
        raise ValueError("nothing to aggregate: no client update")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} updates but {len(weights)} weights")
    names = arrays[0].keys()
    for i, update in enumerate(arrays[1:], start=1):
        if update.keys() != names:
            raise ValueError(f"update {i} has keys {sorted(update)[:5]}..., update 0 has {sorted(names)[:5]}...")


def _stack(arrays: Sequence[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """(clients, *shape) in float64: robust statistics must not round differently per client."""
    return torch.stack([update[name].double() for update in arrays])


def weighted_mean(arrays: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al., 2017): Σ_k w_k x_k / Σ_k w_k, key by key, in float64 then back to each dtype."""
    _check(arrays, weights)
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"aggregation weights sum to {total}; they must be positive")
    out: dict[str, torch.Tensor] = {}
    for name in arrays[0]:
        # (clients, *shape) -> (*shape): one weighted reduction per tensor
        stacked = _stack(arrays, name)
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
        out[name] = ((stacked * w).sum(0) / total).to(arrays[0][name].dtype)
    return out


def coordinate_median(arrays: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (Yin et al., 2018); with an even count, the mean of the two middle values.

    Weights are ignored on purpose: a Byzantine client could otherwise claim a huge
    example count. Tolerates fewer than half of the clients being arbitrary.
    """
    _check(arrays, weights)
    out: dict[str, torch.Tensor] = {}
    for name in arrays[0]:
        ordered = _stack(arrays, name).sort(dim=0).values
        n = ordered.shape[0]
        out[name] = ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).to(arrays[0][name].dtype)
    return out


def trimmed_mean(beta: float) -> Combine:
    """Coordinate-wise β-trimmed mean (Yin et al., 2018): drop ⌊β·n⌋ values at each end, average the rest."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim fraction beta={beta!r} must be in [0, 0.5)")

    def combine(arrays: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        _check(arrays, weights)
        n = len(arrays)
        cut = int(beta * n)
        out: dict[str, torch.Tensor] = {}
        for name in arrays[0]:
            kept = _stack(arrays, name).sort(dim=0).values[cut : n - cut]
            out[name] = kept.mean(0).to(arrays[0][name].dtype)
        return out

    combine.__name__ = f"trimmed_mean_{beta:g}"
    return combine


def delta_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over the keys both hold with the same shape (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for name, ref in reference.items():
        value = update.get(name)
        if value is not None and value.shape == ref.shape:
            total += (value.double() - ref.double()).pow(2).sum()
    return float(total.sqrt())


def norm_clipped(combine: Combine, reference: Mapping[str, torch.Tensor], max_norm: float) -> Combine:
    """``combine`` over updates whose delta from ``reference`` is scaled to L2 norm ≤ ``max_norm``.

    Only the keys of ``reference`` (the global state sent this round) are clipped,
    as one vector per client; other keys (a method's statistics) pass unchanged.
    """
    if not max_norm > 0:
        raise ValueError(f"clipping norm max_norm={max_norm!r} must be > 0")

    def clipped(arrays: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        out = []
        for update in arrays:
            scale = min(1.0, max_norm / max(delta_norm(update, reference), 1e-12))
            if scale >= 1.0:
                out.append(update)
                continue
            moved = dict(update)
            for name, ref in reference.items():
                if name in moved and moved[name].shape == ref.shape:
                    delta = moved[name].double() - ref.double()
                    moved[name] = (ref.double() + scale * delta).to(moved[name].dtype)
            out.append(moved)
        return combine(out, weights)

    clipped.__name__ = f"norm_clipped_{getattr(combine, '__name__', 'combine')}"
    return clipped
