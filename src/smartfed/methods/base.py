"""The ``Method`` abstraction every federated algorithm implements (DESIGN.md §3).

A method says how a client builds its trainable model from the base model and
the LoRA pool, which tensors it communicates, how one local round trains, and
what the server does with the aggregated state. The Flower apps are generic:
they only move these tensors (arrays, never pickles) and call these hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..more import LoraPool


@dataclass
class LocalResult:
    """What one client returns after a local round."""

    state: dict[str, torch.Tensor]  # the communicated tensors (averaged by the server)
    num_examples: int
    train_loss: float
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # also averaged, by examples


@dataclass
class ServerUpdate:
    """What the server sends with the next round's state."""

    payload: dict[str, object] = field(default_factory=dict)  # JSON-serialisable, goes into the ConfigRecord
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # arrays sent down beside the state
    log: dict[str, object] = field(default_factory=dict)  # recorded in metrics.jsonl


@dataclass(frozen=True)
class LocalTrainConfig:
    learning_rate: float
    weight_decay: float = 0.0
    budget: float = 1.0  # the client's budget β ∈ (0, 1] (A³SMoE-style heterogeneity)


class Method(ABC):
    """One federated fine-tuning algorithm on the shared runtime."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abstractmethod
    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        """Wrap the frozen base ``model`` into the trainable client model."""

    @abstractmethod
    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a client sends up (and the server sends down)."""

    @abstractmethod
    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load the server's state into the client model."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def prepare_round(  # noqa: B027 (optional hook)
        self,
        model: nn.Module,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        """Apply what the server sent beside the state (quotas, ...) before training or evaluating."""

    def local_train(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, torch.Tensor]],
        config: LocalTrainConfig,
    ) -> LocalResult:
        """AdamW over the method's trainable parameters, one step per batch."""
        params = self.trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        model.train()
        losses, examples = [], 0
        for batch in batches:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            examples += int(batch["input_ids"].shape[0])
        model.eval()
        return LocalResult(
            state=self.get_state(model), num_examples=examples, train_loss=sum(losses) / max(len(losses), 1)
        )

    def server_update(
        self,
        server_round: int,
        model: nn.Module,
        extras: Mapping[str, torch.Tensor],
    ) -> ServerUpdate:
        """Server-side step after aggregation (``model`` already holds the averaged state)."""
        return ServerUpdate()

    def restore_payload(self, model: nn.Module, payload: Mapping[str, object]) -> None:  # noqa: B027 (optional hook)
        """Re-apply a saved server payload on resume (e.g. quotas)."""
