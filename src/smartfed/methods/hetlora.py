"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024).

- Truncation: a client of budget β starts at rank ``r_c = max(1, ⌊β·r⌋)`` and
  takes the leading r_k ≤ r_c components of the global rank-r LoRA.
- Rank self-pruning: local training adds ``λ·Σ_t ‖s·B_tail A_tail‖_F`` over
  the last ``max(1, ⌊γ·r_k⌋)`` components of every matrix; when the tail's norm
  after a round is below the norm it had after the client's previous round,
  the tail is pruned (r_k shrinks, never below ``min_rank``) and the new tail
  starts without history. The rank and the norm are the client's private state.
- Aggregation: zero-pad every client's factors to rank r and average them
  per matrix with weights ∝ ‖B_k A_k‖_F ("sparsity-weighted"; uniform when
  every product is zero), then the clients truncate again.

Deviation: a client sends its factors at its starting rank r_c, with pruned
components as zeros, so every reply has a shape the server can check
(``expected_update``); the bytes up count those zeros (a sparse encoding
would save the pruned share). Options: ``--method_options
prune_fraction=0.25,prune_lambda=0.01,min_rank=1,self_prune=true``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..run.config import RunConfig
from .aggregation import Combine, weighted_mean
from .base import ClientUpdate, LocalResult, LocalTrainConfig, ServerUpdate, parse_options
from .lora_common import (
    ADAPTER,
    RankedLoraMethod,
    a_keys,
    b_key,
    client_rank,
    lora_layers,
    lora_state,
    mask_rank,
    truncate_state,
)
from .registry import register_method

RANK_PREFIX = "hetlora.rank."  # aggregate() → server_update(): each client's active rank, for the log
PRIVATE = "hetlora.rank_and_tail_norm"


@dataclass(frozen=True)
class HetLoRAOptions:
    prune_fraction: float = 0.25  # γ: share of the current rank that forms the prunable tail
    prune_lambda: float = 0.01  # λ: weight of the tail-norm regulariser
    min_rank: int = 1  # self-pruning never goes below this rank
    self_prune: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.prune_fraction < 1:
            raise ValueError(f"hetlora: prune_fraction={self.prune_fraction!r} must be in (0, 1)")
        if not self.prune_lambda >= 0:
            raise ValueError(f"hetlora: prune_lambda={self.prune_lambda!r} must be >= 0")
        if self.min_rank < 1:
            raise ValueError(f"hetlora: min_rank={self.min_rank!r} must be >= 1")


def zero_pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r_k, d_in) → (rank, d_in) and B (d_out, r_k) → (d_out, rank), new components zero."""
    pad = rank - a.shape[0]
    if pad < 0:
        raise ValueError(f"a client sent rank {a.shape[0]} > the global rank {rank}")
    return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))


def active_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """Components whose A row or B column is not all zero (pruned ones are exactly zero)."""
    used = a.ne(0).any(dim=1) | b.ne(0).any(dim=0)
    return int(used.nonzero().max()) + 1 if used.any() else 0


@register_method
class HetLoRA(RankedLoraMethod):
    name = "hetlora"
    summary = "HetLoRA: client ranks from β, zero-pad + norm-weighted average, truncation, rank self-pruning."

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.options = parse_options(HetLoRAOptions, config.method_options, method=self.name)
        # this round's client (set by set_private_state/prepare_round, used by local_train, read back
        # by get_private_state within one client call; never carried from one client to the next)
        self._private: Mapping[str, torch.Tensor] | None = None
        self._rank = config.lora_rank
        self._tail_norm = -1.0

    # --- the client's rank and tail norm (private) -------------------------------------------
    def set_private_state(self, model: nn.Module, private: Mapping[str, torch.Tensor] | None) -> None:
        self._private = private

    def get_private_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {PRIVATE: torch.tensor([float(self._rank), self._tail_norm], dtype=torch.float64)}

    def prepare_round(
        self,
        model: nn.Module,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        start = client_rank(self.config.lora_rank, config.budget)
        if self._private is None or PRIVATE not in self._private:  # first round of this client
            self._rank, self._tail_norm = start, -1.0
        else:
            rank, norm = self._private[PRIVATE].tolist()
            self._rank, self._tail_norm = min(int(rank), start), float(norm)
        self._private = None
        mask_rank(model, self._rank)  # truncation of the global LoRA to the client's rank

    def _tail(self) -> tuple[int, int]:
        """[start, end) of the prunable tail of the current rank (empty at min_rank)."""
        length = max(1, math.floor(self.options.prune_fraction * self._rank))
        length = min(length, self._rank - self.options.min_rank)
        return self._rank - max(length, 0), self._rank

    def tail_norm(self, model: nn.Module) -> torch.Tensor:
        """Σ over matrices of ‖s·B_tail A_tail‖_F (differentiable)."""
        lo, hi = self._tail()
        total = torch.zeros(())
        if hi <= lo:
            return total
        for layer in lora_layers(model).values():
            a, b = layer.lora_A[ADAPTER].weight[lo:hi], layer.lora_B[ADAPTER].weight[:, lo:hi]
            total = total + layer.scaling[ADAPTER] * torch.linalg.matrix_norm(b @ a)
        return total

    def local_train(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        params = self.trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        regularise = self.options.self_prune and self.options.prune_lambda > 0
        model.train()
        losses: list[float] = []
        for batch in batches:
            loss = model(**batch).loss
            objective = loss + self.options.prune_lambda * self.tail_norm(model) if regularise else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            losses.append(loss.item())  # the task loss, comparable across methods
        model.eval()
        if self.options.self_prune:
            self._self_prune(model)
        return LocalResult(
            state=truncate_state(lora_state(model), client_rank(self.config.lora_rank, config.budget)),
            num_examples=config.num_examples,
            train_loss=sum(losses) / max(len(losses), 1),
        )

    def _self_prune(self, model: nn.Module) -> None:
        lo, hi = self._tail()
        if hi <= lo:
            return
        with torch.no_grad():
            norm = float(self.tail_norm(model))
        if 0 <= norm < self._tail_norm:  # the regulariser is winning: drop the tail
            self._rank, self._tail_norm = lo, -1.0
            mask_rank(model, self._rank)
        else:
            self._tail_norm = norm

    # --- server ------------------------------------------------------------------------------
    def aggregate(self, updates: Sequence[ClientUpdate], combine: Combine = weighted_mean) -> dict[str, torch.Tensor]:
        rank = self.config.lora_rank
        out: dict[str, torch.Tensor] = {}
        for key in a_keys(updates[0].arrays):
            padded = [zero_pad(u.arrays[key], u.arrays[b_key(key)], rank) for u in updates]
            norms = [float(torch.linalg.matrix_norm(b.double() @ a.double())) for a, b in padded]
            weights = norms if sum(norms) > 0 else [1.0] * len(norms)
            out.update(combine([{key: a, b_key(key): b} for a, b in padded], weights))
        for u in updates:
            ranks = [active_rank(u.arrays[k], u.arrays[b_key(k)]) for k in a_keys(u.arrays)]
            out[f"{RANK_PREFIX}{u.partition}"] = torch.tensor([float(max(ranks))])
        return out

    def server_update(self, server_round: int, model: nn.Module, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        ranks = {k.removeprefix(RANK_PREFIX): int(v) for k, v in extras.items() if k.startswith(RANK_PREFIX)}
        return ServerUpdate(log={"hetlora_client_ranks": ranks} if ranks else {})
