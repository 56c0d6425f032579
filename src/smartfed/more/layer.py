"""MoRE layer: a frozen base matrix plus top-K routed rank-one LoRA experts.

    y = W0 x + B_t · (g(x) ⊙ s_t ⊙ (A_t x))            (SmartFed, seed 001; DESIGN.md §1)

Vectorised like PEFT's ``poly`` tuner: the M experts are stacked, so the layer
does one matmul down (A_t) and one up (B_t), never a Python loop over experts.
The per-expert scale s_t is folded into B_t once, at construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoreConfig
from .pool import PoolModule
from .router import Router, top_k_gates


def base_layer_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear, a transformers Conv1D, or a quantised Linear."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    if type(layer).__name__ == "Conv1D":  # GPT-2 style: weight (d_in, d_out)
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"{type(layer).__name__} is neither an nn.Linear nor a Conv1D")


class MoreLinear(nn.Module):
    """Wraps one target matrix; only ``router`` is trainable."""

    def __init__(
        self,
        base_layer: nn.Module,
        experts: PoolModule,
        config: MoreConfig,
        *,
        top_k: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.gate = config.gate
        self.num_experts = experts.num_experts
        self.top_k = top_k
        weight = base_layer.weight
        dtype = config.expert_torch_dtype(weight.dtype)
        device = weight.device
        scaled_b = experts.B * experts.scale  # (d_out, M): s_m folded into column m
        # Frozen, non-persistent: the experts live in the pool files, not in checkpoints.
        self.register_buffer("lora_A", experts.A.to(device=device, dtype=dtype), persistent=False)  # (M, d_in)
        self.register_buffer("lora_B", scaled_b.to(device=device, dtype=dtype), persistent=False)  # (d_out, M)
        self.register_buffer(
            "expert_norm", scaled_b.norm(dim=0).to(device=device, dtype=torch.float32), persistent=False
        )  # (M,)
        self.router = Router(self.num_experts, experts.in_features, config, device=device, generator=generator)
        self.track_stats = False
        self.stat_token_mask: torch.Tensor | None = None  # (batch, seq) attention mask while tracking
        self._init_stats()

    def _init_stats(self) -> None:
        device = self.lora_A.device
        self.register_buffer(
            "stat_gate_mass", torch.zeros(self.num_experts, dtype=torch.float64, device=device), persistent=False
        )
        self.register_buffer(
            "stat_contribution", torch.zeros(self.num_experts, dtype=torch.float64, device=device), persistent=False
        )
        self.register_buffer("stat_tokens", torch.zeros((), dtype=torch.float64, device=device), persistent=False)

    def reset_stats(self) -> None:
        self.stat_gate_mass.zero_()
        self.stat_contribution.zero_()
        self.stat_tokens.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, gates): z = A x (..., M) in the expert dtype, gates (..., M) with top_k nonzero."""
        z = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., d_in) -> (..., M)
        logits = self.router(x, z)  # (..., M) in the router dtype
        return z, top_k_gates(logits, self.top_k, self.gate)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., d_out)
        z, gates = self.route(x)
        h = z * gates.to(z.dtype)  # (..., M): gated rank-space activations
        delta = F.linear(h, self.lora_B)  # (..., M) -> (..., d_out)
        if self.track_stats:
            self._accumulate(result, z, gates)
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def _accumulate(self, result: torch.Tensor, z: torch.Tensor, gates: torch.Tensor) -> None:
        """Per expert: gate mass and g_m ‖s_m B_m‖ |A_m x| / ‖W0 x‖ (DESIGN.md §2), summed over tokens."""
        g = gates.detach().float().reshape(-1, self.num_experts)  # (N, M)
        a = z.detach().float().abs().reshape(-1, self.num_experts)  # (N, M)
        base_norm = result.detach().float().reshape(-1, result.shape[-1]).norm(dim=-1, keepdim=True)  # (N, 1)
        mask = self.stat_token_mask
        if mask is not None and mask.numel() == g.shape[0]:  # padding tokens say nothing about the task
            keep = mask.reshape(-1).to(torch.bool)  # (N,)
            g, a, base_norm = g[keep], a[keep], base_norm[keep]
        # ‖b_m (a_m)‖ = |a_m| ‖b_m‖: the norm of a rank-one output without forming it.
        contribution = g * a * self.expert_norm / base_norm.clamp_min(1e-6)  # (N, M)
        self.stat_gate_mass += g.sum(0).double()
        self.stat_contribution += contribution.sum(0).double()
        self.stat_tokens += g.shape[0]

    def stats(self) -> dict[str, torch.Tensor | int]:
        """Means over the tokens seen since the last reset."""
        tokens = max(float(self.stat_tokens), 1.0)
        return {
            "gate_mass": (self.stat_gate_mass / tokens).float().cpu(),
            "contribution": (self.stat_contribution / tokens).float().cpu(),
            "tokens": int(self.stat_tokens),
        }

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, gate={self.gate!r}, router={self.router.kind!r}"
