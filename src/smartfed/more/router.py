"""The trainable router of a MoRE layer and its top-K gates.

The router is the only tensor SmartFed trains and communicates (Wu et al., 2025): per
target matrix, logits over its M rank-one experts, of which the top K_t per
token (its ``top_k``) are kept and weighted by a gate function (``GATES``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoreConfig


@dataclass(frozen=True)
class Gate:
    """A gate function over the kept logits, and the closed form of its backward.

    ``forward(kept) -> gates``: (..., K) kept logits to their gates.
    ``backward(u, gates, kept) -> ∂L/∂logits`` (..., M), from ``u = gates ⊙ ∂L/∂gates``
    and the dense gates (..., M), ``kept`` = K, the nonzero gates per row. It must be
    a multiple of the gate, so a dropped expert (gate exactly 0) gets exactly 0 without
    knowing which were kept: the backward needs neither the top-K indices nor the kept
    logits (see ``top_k_gates_backward``).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

    def __call__(self, kept: torch.Tensor) -> torch.Tensor:
        return self.forward(kept)


def _softmax_backward(u: torch.Tensor, gates: torch.Tensor, scale: int) -> torch.Tensor:
    """Softmax ``p`` scaled by ``c``, ``g = c p``: ``∂L/∂l = g ⊙ ∂L/∂g - p Σ_j g_j ∂L/∂g_j = u - (g / c) Σ_j u_j``."""
    total = u.sum(-1, keepdim=True)  # (..., 1)
    if scale != 1:
        total.div_(scale)
    return torch.addcmul(u, gates, total, value=-1.0)  # (..., M)


def _scaled_softmax(kept: torch.Tensor) -> torch.Tensor:
    # top_k * softmax: equal logits give every kept expert weight 1, as inside a plain LoRA.
    return kept.shape[-1] * torch.softmax(kept, dim=-1)


def _scaled_softmax_backward(u: torch.Tensor, gates: torch.Tensor, kept: int) -> torch.Tensor:
    return _softmax_backward(u, gates, kept)  # c = K


def _softmax(kept: torch.Tensor) -> torch.Tensor:
    return torch.softmax(kept, dim=-1)


def _plain_softmax_backward(u: torch.Tensor, gates: torch.Tensor, kept: int) -> torch.Tensor:
    return _softmax_backward(u, gates, 1)  # c = 1


def _sigmoid_backward(u: torch.Tensor, gates: torch.Tensor, kept: int) -> torch.Tensor:
    """``g = σ(l)``: ``∂L/∂l = ∂L/∂g ⊙ g (1 - g) = u (1 - g)``."""
    return torch.addcmul(u, u, gates, value=-1.0)  # (..., M)


#: Every gate, once: name (``MoreConfig.gate``, ``GateType``) -> its forward and backward.
GATES: dict[str, Gate] = {
    "scaled_softmax": Gate(_scaled_softmax, _scaled_softmax_backward),
    "softmax": Gate(_softmax, _plain_softmax_backward),
    "sigmoid": Gate(torch.sigmoid, _sigmoid_backward),
}


def top_k_gates(logits: torch.Tensor, top_k: int, gate: str) -> torch.Tensor:
    """Dense gates (..., M) with exactly ``top_k`` nonzero entries per row.

    Non-kept experts get a gate of exactly 0, so they add nothing to the output and
    receive no gradient; the kept ones get ``GATES[gate]`` of their logits.
    """
    gate_fn = GATES[gate].forward
    if top_k >= logits.shape[-1]:
        return gate_fn(logits)
    kept, index = logits.topk(top_k, dim=-1, sorted=False)  # (..., top_k)
    return torch.zeros_like(logits).scatter_(-1, index, gate_fn(kept))  # (..., M)


def top_k_gates_backward(u: torch.Tensor, gates: torch.Tensor, top_k: int, gate: str) -> torch.Tensor:
    """The gradient of the loss w.r.t. the logits of ``top_k_gates``, from ``u = gates ⊙ ∂L/∂gates`` (..., M).

    The gate's closed form (``Gate.backward``), restricted to the kept experts: each is
    a multiple of the gate, so dropped experts get exactly 0 from the dense gates alone.
    """
    return GATES[gate].backward(u, gates, min(top_k, gates.shape[-1]))


def rank_input_scale(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per token ``c = ‖x‖₁ / ‖z‖₁`` (T, 1), a constant of the graph (no gradient flows through it).

    Why: AdamW moves every router weight by about the learning rate per step, so a
    logit moves by about lr·‖features‖₁. The linear router reads x (d_in features);
    the rank router reads z = A x (M ≪ d_in features, and A shrinks them), so at the
    same learning rate its logits moved ~10× slower on SmolLM2 (M = 16, d_in = 576)
    and it stayed where it started. Reading ``c z`` gives its input the layer
    input's L1 mass, so both routers move alike at one learning rate, on any model.
    """
    with torch.no_grad():
        x_mass = torch.linalg.vector_norm(x, ord=1, dim=-1, keepdim=True, dtype=torch.float32)  # (T, 1)
        z_mass = torch.linalg.vector_norm(z, ord=1, dim=-1, keepdim=True, dtype=torch.float32)  # (T, 1)
        return (x_mass / z_mass.clamp_min(1e-12)).to(z.dtype)


class Router(nn.Module):
    """Logits over the M experts of one matrix.

    ``linear`` reads the layer input x (W_r: (M, d_in)); ``rank`` reads the
    rank-space activations z = A x (W_r: (M, M)), a router d_in/M times smaller,
    scaled per token by ``rank_input_scale`` unless ``rank_input="raw"``.
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
        self.match = config.router == "rank" and config.rank_input == "matched"
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
        if self.kind == "linear":
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        features = z * rank_input_scale(x, z) if self.match else z
        return F.linear(features.to(self.weight.dtype), self.weight, self.bias)
