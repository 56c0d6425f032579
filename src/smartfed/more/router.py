"""The trainable router of a MoRE layer and its top-K gates.

The router is the only tensor SmartFed trains and communicates (seed 001): per
target matrix, logits over its M rank-one experts, of which the top K_t per
token are kept and weighted by a gate function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoreConfig


def _scaled_softmax(kept: torch.Tensor) -> torch.Tensor:
    # K * softmax: equal logits give every kept expert weight 1, as inside a plain LoRA.
    return kept.shape[-1] * torch.softmax(kept, dim=-1)


def _softmax(kept: torch.Tensor) -> torch.Tensor:
    return torch.softmax(kept, dim=-1)


GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "scaled_softmax": _scaled_softmax,
    "softmax": _softmax,
    "sigmoid": torch.sigmoid,
}


def top_k_gates(logits: torch.Tensor, k: int, gate: str) -> torch.Tensor:
    """Dense gates (..., M) with exactly ``k`` nonzero entries per row.

    Non-kept experts get a gate of exactly 0, so they add nothing to the output and
    receive no gradient; the kept ones get ``GATES[gate]`` of their logits.
    """
    gate_fn = GATES[gate]
    if k >= logits.shape[-1]:
        return gate_fn(logits)
    kept, index = logits.topk(k, dim=-1, sorted=False)  # (..., k)
    return torch.zeros_like(logits).scatter(-1, index, gate_fn(kept))  # (..., M)


class Router(nn.Module):
    """Logits over the M experts of one matrix.

    ``linear`` reads the layer input x (W_r: (M, d_in)); ``rank`` reads the
    rank-space activations A x (W_r: (M, M)), a router d_in/M times smaller.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        config: MoreConfig,
        *,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.kind = config.router
        fan_in = in_features if config.router == "linear" else num_experts
        dtype = config.router_torch_dtype
        self.weight = nn.Parameter(torch.zeros(num_experts, fan_in, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=dtype, device=device)) if config.router_bias else None
        if config.router_init == "normal":
            with torch.no_grad():
                noise = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32)
                self.weight.copy_(noise * config.router_init_std)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) layer input; z: (..., M) = A x. Returns logits (..., M)."""
        features = x if self.kind == "linear" else z
        return F.linear(features.to(self.weight.dtype), self.weight, self.bias)
