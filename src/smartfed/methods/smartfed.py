"""SmartFed (Wu et al., 2025, "Elastic Mixture of Rank-Wise Experts for Knowledge Reuse in
Federated Fine-Tuning"): clients train only MoRE routers; the server averages them and runs EEQA.

- Client: AdamW on the routers of a MoRE model over the shared LoRA pool;
  per-expert importance (``--eeqa_importance``, docs/design.md §4: by default the
  router's softmax over all experts times each expert's contribution, so an
  expert scores whether it was kept or not) is accumulated over the local
  steps and sent up beside the router, when someone reads it: EEQA on the
  server, or clients with a budget β < 1.
  Otherwise the client skips the expert statistics and sends the router alone.
- Server: Flower's FedAvg averages routers and importances by examples
  (both are arrays in the reply); EEQA turns the importance into per-matrix
  quotas every ``eeqa_period`` rounds; the quotas go down with the router.
- A client with budget β < 1 keeps ⌊β·K_total⌋ experts, re-allocated over the
  matrices with the server's importance (A³SMoE's setting).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..eeqa import allocate_quotas, client_budget
from ..more import LoraPool, MoreConfig, MoreModel, attach_more
from ..run.config import RunConfig
from .base import LocalResult, LocalTrainConfig, Method, ServerUpdate
from .registry import register_method

IMPORTANCE_PREFIX = "importance."
QUOTAS = "quotas"


@register_method
class SmartFed(Method):
    name = "smartfed"
    summary = "Route rank-one experts of existing LoRAs; train and average only the routers; EEQA quotas."

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def more_config(self) -> MoreConfig:
        c = self.config
        return MoreConfig(
            top_k=c.topk_experts,
            router=c.router,
            rank_input=c.rank_input,
            gate=c.gate,
            router_init=c.router_init,
            router_init_std=c.router_init_std,
            router_bias=c.router_bias,
            router_dtype=c.router_dtype,
        )

    def check_pool(self, pool: LoraPool) -> None:
        """K experts per token must exist in every matrix: K ≤ the fewest experts (summed adapter ranks) of any."""
        if not pool.modules:
            return
        fewest = min(pool.modules.values(), key=lambda m: m.num_experts)
        if self.config.topk_experts > fewest.num_experts:
            raise ValueError(
                f"--topk_experts {self.config.topk_experts} exceeds the pool's expert count: matrix {fewest.name!r} "
                f"has {fewest.num_experts} rank-one experts (its adapters' ranks summed); "
                f"use --topk_experts <= {fewest.num_experts}"
            )

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> MoreModel:
        if pool is None:
            raise ValueError("method 'smartfed' needs --lora_pool")
        self.check_pool(pool)
        more = attach_more(model, pool, self.more_config(), generator=generator)
        self._check_budgets(more)
        return more

    def _check_budgets(self, model: MoreModel) -> None:
        """Every client budget β must leave each matrix k_min experts: a configuration error at start, not each round."""
        budgets = sorted(set(self.config.budgets()))
        if budgets == [1.0]:
            return
        total, need = self.total_budget(model), self.config.eeqa_k_min * len(model.more_layers())
        if need > total:
            raise ValueError(
                f"--eeqa_k_min={self.config.eeqa_k_min} × {len(model.more_layers())} matrices = {need} exceeds "
                f"the expert budget K_total={total}"
            )
        if client_budget(total, budgets[0]) < need:
            smallest = math.ceil(100 * need / total) / 100  # two decimals, rounded up: floor(β·K_total) ≥ need
            raise ValueError(
                f"--client_budgets: β={budgets[0]:g} keeps {client_budget(total, budgets[0])} of K_total={total} "
                f"experts, fewer than --eeqa_k_min={self.config.eeqa_k_min} for each of the "
                f"{len(model.more_layers())} matrices ({need}); the smallest β that fits is {smallest:g}"
            )

    def get_state(self, model: MoreModel) -> dict[str, torch.Tensor]:
        return model.router_state_dict()

    def set_state(self, model: MoreModel, state: Mapping[str, torch.Tensor]) -> None:
        model.load_router_state_dict(dict(state), source="server router state")

    def trainable_parameters(self, model: MoreModel) -> list[nn.Parameter]:
        return model.trainable_parameters()

    # --- quotas ----------------------------------------------------------------
    def total_budget(self, model: MoreModel) -> int:
        """K_total = Σ_t K_t at the configured K (docs/design.md §4)."""
        return sum(min(self.config.topk_experts, layer.num_experts) for layer in model.more_layers().values())

    def _allocate(self, model: MoreModel, importance: Mapping[str, torch.Tensor], budget: int) -> dict[str, int]:
        k_max = self.config.eeqa_k_max or None
        return allocate_quotas(importance, budget, k_min=self.config.eeqa_k_min, k_max=k_max).quotas

    def prepare_round(
        self,
        model: MoreModel,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        quotas = payload.get(QUOTAS)
        if quotas:
            model.set_quotas({k: int(v) for k, v in dict(quotas).items()})
        if config.budget < 1.0:
            budget = client_budget(self.total_budget(model), config.budget)
            importance = {k.removeprefix(IMPORTANCE_PREFIX): v for k, v in extras.items()}
            if not importance:  # no importance yet: spread the budget evenly
                importance = {name: torch.ones(layer.num_experts) for name, layer in model.more_layers().items()}
            model.set_quotas(self._allocate(model, importance, budget))

    def needs_importance(self) -> bool:
        """Whether the importance is read: by EEQA on the server, or by clients that re-allocate a budget β < 1."""
        return self.config.enable_eeqa or any(b < 1.0 for b in self.config.budgets())

    def local_train(
        self, model: MoreModel, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        if not self.needs_importance():  # the statistics cost every step a few small ops per matrix: skip them
            return super().local_train(model, batches, config)
        with model.tracking_expert_stats():
            result = super().local_train(model, batches, config)
        key = self.config.eeqa_importance
        result.extras = {IMPORTANCE_PREFIX + name: stats[key] for name, stats in model.expert_stats().items()}
        return result

    def server_update(self, server_round: int, model: MoreModel, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        importance = {
            k.removeprefix(IMPORTANCE_PREFIX): v for k, v in extras.items() if k.startswith(IMPORTANCE_PREFIX)
        }
        update = ServerUpdate(extras={IMPORTANCE_PREFIX + k: v for k, v in importance.items()})
        if self.config.enable_eeqa and importance and server_round % self.config.eeqa_period == 0:
            allocation = allocate_quotas(
                importance, self.total_budget(model), k_min=self.config.eeqa_k_min, k_max=self.config.eeqa_k_max or None
            )
            model.set_quotas(allocation.quotas)
            update.log["eeqa_gap"] = allocation.gap
        update.payload[QUOTAS] = model.quotas()
        update.log["quotas"] = model.quotas()
        return update

    def restore_payload(self, model: MoreModel, payload: Mapping[str, object]) -> None:
        if payload.get(QUOTAS):
            model.set_quotas({k: int(v) for k, v in dict(payload[QUOTAS]).items()})
