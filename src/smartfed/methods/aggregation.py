"""Server-side combination of client arrays: FedAvg's weighted mean, and the type robust rules share."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (per-client {name: tensor}, per-client weight) -> {name: combined tensor}
Combine = Callable[[Sequence[dict[str, torch.Tensor]], Sequence[float]], dict[str, torch.Tensor]]


def weighted_mean(arrays: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al., 2017): Σ_k w_k x_k / Σ_k w_k, key by key, in float64 then back to each dtype."""
    if not arrays:
        raise ValueError("nothing to aggregate: no client update")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"aggregation weights sum to {total}; they must be positive")
    names = arrays[0].keys()
    for i, update in enumerate(arrays[1:], start=1):
        if update.keys() != names:
            raise ValueError(f"update {i} has keys {sorted(update)[:5]}..., update 0 has {sorted(names)[:5]}...")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        # (clients, *shape) -> (*shape): one weighted reduction per tensor
        stacked = torch.stack([update[name].double() for update in arrays])
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
        out[name] = ((stacked * w).sum(0) / total).to(arrays[0][name].dtype)
    return out
