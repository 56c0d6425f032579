"""Per-expert statistics of MoRE layers: gate mass and contribution, summed over tokens (docs/design.md §4).

What EEQA's importance (``--eeqa_importance``) and A³SMoE's activation frequency
read. Each ``MoreLinear`` owns an ``ExpertStats`` and feeds it from its forward
while its ``track_stats`` is on; ``MoreModel.tracking_expert_stats`` turns that
on for every layer (``tracking``), ``MoreModel.forward`` hands the layers the
attention mask so padding is not counted (``token_mask``), and
``MoreModel.expert_stats`` reads the means (``ExpertStats.means``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

#: Per-expert sums the statistics keep (each (M,) float64): see ``ExpertStats.accumulate``.
STAT_SUMS = ("gate_mass", "contribution", "prob_contribution", "gated_contribution")


def token_norms(result: torch.Tensor) -> torch.Tensor:
    """‖W0 x‖ per token: (..., d_out) -> (N,) float32."""
    return torch.linalg.vector_norm(result.detach().reshape(-1, result.shape[-1]), dim=-1, dtype=torch.float32)


class ExpertStats(nn.Module):
    """Running per-expert sums of one MoRE matrix (float64 buffers, not saved in checkpoints)."""

    SUMS = STAT_SUMS

    def __init__(self, num_experts: int, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        for key in self.SUMS:
            self.register_buffer(key, torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64, device=device), persistent=False)

    def reset(self) -> None:
        for key in self.SUMS:
            getattr(self, key).zero_()
        self.tokens.zero_()

    @torch.no_grad()
    def accumulate(
        self,
        base_norm: torch.Tensor,
        z: torch.Tensor,
        logits: torch.Tensor,
        gates: torch.Tensor,
        expert_norm: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> None:
        """Per expert m, summed over tokens, with ``c_m(x) = ‖s_m B_m‖ |A_m x| / ‖W0 x‖``:

        - ``gate_mass``: g_m(x), the kept gate;
        - ``contribution``: c_m(x), what the expert would add, kept or not;
        - ``prob_contribution``: p_m(x) c_m(x) with p the softmax over *all* M logits: the router's
          preference times the size of the expert's output, for every expert, kept or not;
        - ``gated_contribution``: g_m(x) c_m(x), zero for an expert that is never kept (the first EEQA
          importance, which feeds on its own quota: a matrix at top_k = 1 scores one expert).

        ``base_norm``: ‖W0 x‖ per token (N,), float32; z, logits, gates (..., M); ``expert_norm``:
        ‖s_m B_m‖ (M,); ``token_mask``: the attention mask (batch, seq), 0 for padding, or None.
        The sums over tokens are vector-matrix products with a per-token weight (1 / ‖W0 x‖,
        times 0 for padding), not a boolean selection that copies.
        """
        m = self.num_experts
        g = gates.detach().float().reshape(-1, m)  # (N, M)
        p = torch.softmax(logits.detach().float().reshape(-1, m), dim=-1)  # (N, M) over all experts
        # ‖b_m (a_m)‖ = |a_m| ‖b_m‖: the norm of a rank-one output without forming it.
        c = z.detach().abs().float().reshape(-1, m).mul_(expert_norm)  # (N, M), a copy: written below
        weight = base_norm.clamp_min(1e-6).reciprocal_()  # (N,)
        if token_mask is not None and token_mask.numel() == g.shape[0]:  # padding says nothing about the task
            keep = token_mask.reshape(-1).ne(0).float()  # (N,) 1 for a real token, 0 for padding
            weight.mul_(keep)
            self.gate_mass.add_(keep @ g)  # (N,) @ (N, M) -> (M,), added into the float64 sum in place
            self.tokens.add_(keep.sum())
        else:
            self.gate_mass.add_(g.sum(0))
            self.tokens.add_(g.shape[0])
        self.contribution.add_(weight @ c)  # (N,) @ (N, M) -> (M,)
        self.prob_contribution.add_(weight @ (p * c))
        self.gated_contribution.add_(weight @ c.mul_(g))

    def means(self) -> dict[str, torch.Tensor | int]:
        """Means over the tokens seen since the last reset: each of ``SUMS`` (M,) on the CPU, and ``tokens``."""
        tokens = max(float(self.tokens), 1.0)
        out: dict[str, torch.Tensor | int] = {key: (getattr(self, key) / tokens).float().cpu() for key in self.SUMS}
        out["tokens"] = int(self.tokens)
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}"


class TracksStats(Protocol):
    """What ``tracking`` and ``token_mask`` set on a layer (``MoreLinear``)."""

    track_stats: bool
    stat_token_mask: torch.Tensor | None

    def reset_stats(self) -> None: ...


@contextmanager
def tracking(layers: Iterable[TracksStats], reset: bool = True) -> Iterator[None]:
    """Accumulate the statistics in every forward of ``layers`` inside the block (after zeroing them if ``reset``)."""
    layers = list(layers)
    for layer in layers:
        if reset:
            layer.reset_stats()
        layer.track_stats = True
    try:
        yield
    finally:
        for layer in layers:
            layer.track_stats = False


@contextmanager
def token_mask(layers: Iterable[TracksStats], mask: torch.Tensor) -> Iterator[None]:
    """Give ``layers`` the attention mask (batch, seq) of one forward, so their statistics skip padding tokens."""
    layers = list(layers)
    for layer in layers:
        layer.stat_token_mask = mask
    try:
        yield
    finally:
        for layer in layers:
            layer.stat_token_mask = None
