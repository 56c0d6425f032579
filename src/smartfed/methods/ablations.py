"""SmartFed ablations (docs/design.md §6).

- ``smartfed_module`` (registered here): module-level experts. The same
  federated router training as SmartFed, but at every matrix the experts are
  the pool's *whole adapters* (MoLE's granularity, one router per matrix)
  instead of their rank-one pieces: the router picks the top-K of the N_t
  adapters of matrix t per token (K = min(--topk_experts, N_t); a client of
  budget β keeps max(1, ⌊β·K⌋)), gated like MoRE (``--gate``).
- The other ablations are flags of ``smartfed`` itself and need no name:
  EEQA (``--enable_eeqa``; off by default), router ``--router linear`` vs the
  default ``--router rank``, fixed K (``--topk_experts``). ``ABLATIONS`` lists every
  variant as RunConfig overrides, for side-by-side runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..eeqa import client_budget
from ..more import LoraPool, MoreConfig, Router, top_k_gates
from ..run.config import RunConfig
from .base import LocalTrainConfig
from .mole import AdapterGatedLinear, GatedAdapterMethod, checked_base_layer, freeze, replace_module
from .registry import register_method

# name -> RunConfig overrides: each SmartFed ablation as one run of the same federation.
ABLATIONS: dict[str, dict[str, object]] = {
    "smartfed": {"method": "smartfed"},  # the default: rank router, fixed K, no EEQA
    "smartfed_eeqa": {"method": "smartfed", "enable_eeqa": True},
    "smartfed_linear_router": {"method": "smartfed", "router": "linear"},
    "smartfed_module": {"method": "smartfed_module"},
}

ROUTERS_ATTRIBUTE = "module_routers"


class AdapterRouter(nn.Module):
    """Top-K gates over the N_t adapters of one matrix, from a MoRE ``Router`` on the layer input."""

    def __init__(
        self,
        num_adapters: int,
        in_features: int,
        config: MoreConfig,
        top_k: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.router = Router(num_adapters, in_features, config, generator=generator)
        self.gate = config.gate
        self.full_top_k = top_k  # at budget β = 1; a client keeps max(1, ⌊β·full_top_k⌋)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return top_k_gates(self.router(x, x), self.top_k, self.gate)


@register_method
class SmartFedModule(GatedAdapterMethod):
    name = "smartfed_module"
    summary = "Ablation: SmartFed's federated router over whole adapters per matrix (module-level experts)."
    gates_attribute = ROUTERS_ATTRIBUTE

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        if pool is None:
            raise ValueError("method 'smartfed_module' needs --lora_pool")
        freeze(model)
        c = self.config
        # Whole adapters have no shared rank space for a rank router to read: always a linear router
        # over the layer input, whatever --router says (it applies to the rank-wise methods).
        config = MoreConfig(
            top_k=None,
            router="linear",
            gate=c.gate,
            router_init=c.router_init,
            router_init_std=c.router_init_std,
            router_bias=c.router_bias,
        )
        routers = nn.ModuleDict()
        for name in pool.module_names:
            experts = pool.modules[name]
            # gates over *all* N adapters keep index_select simple; adapters absent here get no expert.
            present = torch.unique(experts.adapter_index)
            if present.numel() != len(pool):
                raise ValueError(
                    f"smartfed_module: matrix {name!r} is targeted by {present.numel()} of the {len(pool)} adapters; "
                    "module-level experts need every adapter to target the same matrices"
                )
            base = checked_base_layer(model, pool, name)
            key = name.replace(".", "_")
            top_k = min(self.config.topk_experts, len(pool))
            routers[key] = AdapterRouter(len(pool), experts.in_features, config, top_k, generator)
            replace_module(model, name, AdapterGatedLinear(base, experts, routers[key].__call__))
        model.add_module(self.gates_attribute, routers)
        return model

    def prepare_round(
        self,
        model: nn.Module,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        # A³SMoE's heterogeneity: a client of budget β keeps ⌊β·K⌋ adapters per matrix (at least one),
        # the floor exact for a decimal β (``client_budget``: ⌊0.29·100⌋ = 29, not int(0.29 * 100) = 28).
        for router in self.gates(model).values():
            router.top_k = max(1, client_budget(router.full_top_k, config.budget))
