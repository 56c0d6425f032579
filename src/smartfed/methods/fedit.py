"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

Knowledge-free baseline: every client trains the same LoRA from scratch
(PEFT, rank ``--lora_rank``, α ``--lora_alpha`` on ``--lora_target_modules``);
the server averages A and B separately by examples (FedAvg). The product of
the averages is not the average of the products (the cross terms FLoRA
removes); that inexactness is FedIT's, kept on purpose.

All clients share one rank, so ``--client_budgets`` does not apply here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..fl.run_config import RunConfig
from ..more import LoraPool
from .base import Method
from .lora_common import build_lora_model, load_lora_state, lora_state
from .registry import register_method


@register_method
class FedIT(Method):
    name = "fedit"
    summary = "FedIT: LoRA trained from scratch, FedAvg of A and B (knowledge-free baseline)."

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        # the pool is not used: this baseline reuses no existing adapter
        c = self.config
        return build_lora_model(
            model, rank=c.lora_rank, alpha=c.lora_alpha, targets=c.lora_target_modules, generator=generator
        )

    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return lora_state(model)

    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_lora_state(model, state, source="fedit server state")
