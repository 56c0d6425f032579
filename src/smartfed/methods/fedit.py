"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

Knowledge-free baseline: every client trains the same LoRA from scratch
(PEFT, rank ``--lora_rank``, α ``--lora_alpha`` on ``--lora_target_modules``);
the server averages A and B separately by examples (FedAvg). The product of
the averages is not the average of the products (the cross terms FLoRA
removes); that inexactness is FedIT's, kept on purpose.

All clients share one rank, so ``--client_budgets`` does not apply here.
"""

from __future__ import annotations

from .lora_common import LoraMethod
from .registry import register_method


@register_method
class FedIT(LoraMethod):
    name = "fedit"
    summary = "FedIT: LoRA trained from scratch, FedAvg of A and B (knowledge-free baseline)."
