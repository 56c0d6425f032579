"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

A learns what clients share, B what is client-specific: only A is sent and
averaged; each client keeps its own B between rounds (Flower's per-node
``context.state``, never sent), starting from zero as LoRA does.

The server holds no B, so scoring the global model would score the base
model. With ``--method_options eval_b=mean`` (the default) clients also send
their B as an extra, and the server scores the global A with the clients'
example-weighted mean B. That B is never sent down; its bytes are counted in
``bytes_up_extras`` (``bytes_up_state`` is FedSA's own uplink, A only).
``eval_b=none`` sends A only and the server scores A with B = 0 (the base).

All clients share one rank, so ``--client_budgets`` does not apply here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..run.config import RunConfig
from .base import LocalResult, LocalTrainConfig, ServerUpdate, parse_options
from .lora_common import B_SUFFIX, LoraMethod, load_lora_state, lora_state
from .registry import register_method

EVAL_PREFIX = "eval_b."


@dataclass(frozen=True)
class FedSAOptions:
    eval_b: str = "mean"  # what B the server scores the global A with: "mean" of the clients' or "none"

    def __post_init__(self) -> None:
        if self.eval_b not in ("mean", "none"):
            raise ValueError(f"fedsa: eval_b={self.eval_b!r} must be 'mean' or 'none'")


@register_method
class FedSA(LoraMethod):
    name = "fedsa"
    summary = "FedSA-LoRA: share and average A only; every client keeps its own B (options: eval_b=mean|none)."

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.options = parse_options(FedSAOptions, config.method_options, method=self.name)

    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in lora_state(model).items() if not k.endswith(B_SUFFIX)}

    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_lora_state(model, state, source="fedsa server state (A)", strict=False)

    def get_private_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in lora_state(model).items() if k.endswith(B_SUFFIX)}

    def set_private_state(self, model: nn.Module, private: Mapping[str, torch.Tensor] | None) -> None:
        if private is None:  # first round of this client: B = 0, LoRA's init
            private = {k: torch.zeros_like(v) for k, v in self.get_private_state(model).items()}
        load_lora_state(model, private, source="fedsa client B", strict=False)

    def local_train(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        result = super().local_train(model, batches, config)
        if self.options.eval_b == "mean":
            result.extras = {EVAL_PREFIX + k: v for k, v in self.get_private_state(model).items()}
        return result

    def server_update(self, server_round: int, model: nn.Module, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        b = {k.removeprefix(EVAL_PREFIX): v for k, v in extras.items() if k.startswith(EVAL_PREFIX)}
        if b:  # for the server's evaluation only: not in the state, not sent down
            load_lora_state(model, b, source="fedsa mean B", strict=False)
        return ServerUpdate()
