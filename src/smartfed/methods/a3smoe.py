"""A³SMoE baseline on the MoRE pool: resource-adaptive top-K and activation-aware aggregation.

Tran et al., "Revisiting Sparse Mixture of Experts for Resource-adaptive
Federated Fine-tuning Foundation Models":

- resource-conditional computation (Eq. 4): client c with budget β_c keeps
  ``K_c = ⌊K_max β_c⌋`` experts per token, bounded to ``[1, M_t]``, in every
  matrix t (here K_max = ``--topk_experts``, the ``top_k`` of a full budget,
  and the experts are the pool's rank-one pieces, as in SmartFed);
- activation-aware aggregation (Eq. 7): clients send, beside their router,
  the activation frequency ``p_ic = a_ic / Σ_j a_jc`` of every expert i; the server
  averages the parameters that belong to expert i with weights
  ``p_dc (p_ic / K_c)^γ`` normalised over the clients (p_dc: the client's data
  share). An expert no client activated falls back to the data shares.

In MoRE the experts are frozen, so "expert i's parameters" are the router's
row i (``W_r[i]`` and ``b[i]``: what produces expert i's logit, for both
router types); γ = 0 is FedAvg. The activation a_ic is the expert's gate mass
over the client's non-padding tokens (``MoreModel.expert_stats``): with equal
gates (a zero router, and the K·softmax gate) it is exactly the paper's count
of tokens that kept expert i in their top-K_c; as the router learns it weighs
each activation by its gate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..eeqa import client_budget
from ..more import MoreModel
from ..run.config import RunConfig
from .aggregation import Combine, weighted_mean
from .base import ClientUpdate, LocalResult, LocalTrainConfig, ServerUpdate, parse_options
from .registry import register_method
from .smartfed import SmartFed

ACTIVATION_PREFIX = "activation."


def client_top_k(top_k: int, budget: float, num_experts: int) -> int:
    """Eq. 4: K_c = ⌊K_max β_c⌋ with K_max = ``top_k`` (the full budget's), bounded to [1, min(top_k, M_t)].

    The floor is exact for a decimal β (``client_budget``): ⌊0.29 · 100⌋ is 29, where
    ``int(0.29 * 100)`` floors the binary product 28.999… to 28.
    """
    return max(1, min(client_budget(top_k, budget), top_k, num_experts))


def activation_aware_weights(
    data_share: torch.Tensor, frequency: torch.Tensor, top_k: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Eq. 7 weights ``(C, M)``: p_dc (p_ic / K_c)^γ, normalised over the C clients for every expert.

    Args:
        data_share: (C,) p_dc (any positive scale: it is normalised).
        frequency: (C, M) p_ic, each client's activation frequency per expert.
        top_k: (C,) K_c of each client.
    Columns whose raw weights are all zero (an expert no client used, with γ > 0)
    fall back to the data shares, so every column sums to 1.
    """
    p_d = data_share.double() / data_share.double().sum()
    raw = p_d[:, None] * (frequency.double() / top_k.double()[:, None]).pow(gamma)  # (C, M); 0^0 = 1: γ=0 is FedAvg
    total = raw.sum(0, keepdim=True)  # (1, M)
    return torch.where(total > 0, raw / total.clamp_min(torch.finfo(torch.float64).tiny), p_d[:, None].expand_as(raw))


@dataclass
class A3SMoEOptions:
    """``--method_options`` of ``a3smoe``."""

    gamma: float = 1.0  # the balancing exponent γ of Eq. 7 (the paper sweeps 0..8)

    def __post_init__(self) -> None:
        if not self.gamma >= 0:
            raise ValueError(f"a3smoe: gamma={self.gamma!r} must be >= 0")


@register_method
class A3SMoE(SmartFed):
    name = "a3smoe"
    summary = "A³SMoE: client top-K_c = ⌊K_max β_c⌋ over MoRE experts; activation-aware router aggregation (γ)."

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.options = parse_options(A3SMoEOptions, config.method_options, method=self.name)
        self._budgets = config.budgets()

    def client_quotas(self, model: MoreModel, budget: float) -> dict[str, int]:
        return {
            name: client_top_k(self.config.topk_experts, budget, layer.num_experts)
            for name, layer in model.more_layers().items()
        }

    def prepare_round(
        self,
        model: MoreModel,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        model.set_quotas(self.client_quotas(model, config.budget))

    def local_train(
        self, model: MoreModel, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        with model.tracking_expert_stats():  # per-expert gate mass over the non-padding tokens
            result = super(SmartFed, self).local_train(model, batches, config)
        result.extras = {
            ACTIVATION_PREFIX + name: stats["gate_mass"] / stats["gate_mass"].sum().clamp_min(1e-12)
            for name, stats in model.expert_stats().items()
        }
        return result

    def aggregate(self, updates: Sequence[ClientUpdate], combine: Combine = weighted_mean) -> dict[str, torch.Tensor]:
        """Eq. 7 for every router row, per matrix; the frequencies are averaged by data share for the log.

        ``combine`` (a robust FedAvg) does not apply: Eq. 7 is the rule here.
        """
        first = updates[0].arrays
        data = torch.tensor([float(u.num_examples) for u in updates])
        out: dict[str, torch.Tensor] = {}
        for key in (k for k in first if k.startswith(ACTIVATION_PREFIX)):
            name = key.removeprefix(ACTIVATION_PREFIX)
            frequency = torch.stack([u.arrays[key] for u in updates])  # (C, M)
            num_experts = frequency.shape[1]
            budgets = [self._budgets[u.partition] for u in updates]
            top_k = torch.tensor([client_top_k(self.config.topk_experts, b, num_experts) for b in budgets])
            weights = activation_aware_weights(data, frequency, top_k, self.options.gamma)  # (C, M)
            for full in (k for k in first if k.startswith(f"{name}.router.")):
                stacked = torch.stack([u.arrays[full].double() for u in updates])  # (C, M, ...): row i = expert i
                w = weights.view(*weights.shape, *([1] * (stacked.dim() - 2)))
                out[full] = (stacked * w).sum(0).to(first[full].dtype)
            out[key] = (frequency.double() * (data / data.sum())[:, None].double()).sum(0).float()
        missing = sorted(set(first) - set(out))
        if missing:
            raise ValueError(f"a3smoe: client arrays {missing[:5]} belong to no MoRE matrix with activation counts")
        return out

    def server_update(self, server_round: int, model: MoreModel, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        frequency = {k.removeprefix(ACTIVATION_PREFIX): v for k, v in extras.items() if k.startswith(ACTIVATION_PREFIX)}
        idle = sum(int((v == 0).sum()) for v in frequency.values())
        total = sum(v.numel() for v in frequency.values())
        # the full-budget view (K_max everywhere) is what the server evaluates
        model.set_quotas(self.client_quotas(model, 1.0))
        return ServerUpdate(log={"idle_expert_fraction": idle / max(total, 1), "quotas": model.quotas()})

    def restore_payload(self, model: MoreModel, payload: Mapping[str, object]) -> None:
        model.set_quotas(self.client_quotas(model, 1.0))
