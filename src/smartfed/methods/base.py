"""The ``Method`` abstraction every federated algorithm implements (docs/design.md §5).

A method says how a client builds its trainable model from the base model and
the LoRA pool, which tensors it communicates, how one local round trains, and
what the server does with the aggregated state. The Flower apps are generic:
they only move these tensors (arrays, never pickles) and call these hooks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..more import LoraPool
from .aggregation import Combine, weighted_mean

OptionsT = TypeVar("OptionsT")


@dataclass
class LocalResult:
    """What one client returns after a local round."""

    state: dict[str, torch.Tensor]  # the communicated tensors (averaged by the server)
    # the client's weight in the server's average, sent as num-examples (ClientUpdate.num_examples); the built-in
    # methods report LocalTrainConfig.num_examples, the client's dataset size (FedAvg's n_k)
    num_examples: int
    train_loss: float
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # also averaged, by examples


@dataclass
class ClientUpdate:
    """One client's reply as the server's aggregation sees it."""

    partition: int  # the client's partition id (stable across runs, unlike Flower node ids)
    arrays: dict[str, torch.Tensor]  # state + extras, as sent
    num_examples: int
    train_loss: float


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
    partition: int = 0  # the client's partition id (per-client rules: clusters, ranks)
    server_round: int = 1
    # the client's local dataset size, FedAvg's n_k (McMahan et al., 2017): what the built-in methods report as
    # LocalResult.num_examples, the weight Flower's FedAvg gives the reply
    num_examples: int = 0


def parse_options(options_type: type[OptionsT], text: str, *, method: str) -> OptionsT:
    """``"key=value,key=value"`` (``--method_options``) into the method's options dataclass.

    Values are converted to the field's default type; unknown keys and bad
    values raise an error that names the method, the key and the value.
    """
    known = {f.name: f for f in fields(options_type)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"--method_options for {method!r}: bad item {item!r}; known keys: {sorted(known)}")
        default = known[key].default
        try:
            if isinstance(default, bool):
                if raw.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                values[key] = raw.strip().lower() in ("true", "1")
            else:
                values[key] = type(default)(raw.strip()) if default is not None else raw.strip()
            if isinstance(values[key], float) and not math.isfinite(values[key]):
                raise ValueError(raw)  # a rate or weight of inf/NaN trains nothing
        except ValueError:
            raise ValueError(
                f"--method_options for {method!r}: {key}={raw!r} is not a valid "
                f"{'finite number' if isinstance(default, float) else type(default).__name__}"
            ) from None
    return options_type(**values)


class Method(ABC):
    """One federated fine-tuning algorithm on the shared runtime."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_pool: ClassVar[bool] = True  # False: the method trains from scratch and needs no --lora_pool

    def check_pool(self, pool: LoraPool) -> None:  # noqa: B027 (most methods take any pool)
        """Refuse, naming the flag, a pool this method cannot serve (called by ``build`` and before a run starts)."""

    @abstractmethod
    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        """Wrap the frozen base ``model`` into the trainable client model."""

    @abstractmethod
    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a client sends up (and the server sends down)."""

    @abstractmethod
    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load the server's state into the client model."""

    def get_private_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors a client keeps between rounds and never sends (e.g. FedSA-LoRA's B); none by default."""
        return {}

    def set_private_state(self, model: nn.Module, private: Mapping[str, torch.Tensor] | None) -> None:  # noqa: B027
        """Restore this client's kept tensors; ``None`` on its first round (reset them to their init).

        Called on every training round: one process may serve many simulated clients with one model.
        """

    def aggregate(self, updates: Sequence[ClientUpdate], combine: Combine = weighted_mean) -> dict[str, torch.Tensor]:
        """Server aggregation of the clients' arrays (state and extras).

        FedAvg by default: ``combine`` is the example-weighted mean, or a robust
        replacement chosen by flag (median, trimmed mean). Methods whose clients
        send differently shaped or non-averageable tensors override this.
        """
        return combine([u.arrays for u in updates], [float(u.num_examples) for u in updates])

    def expected_update(
        self, model: nn.Module, partition: int, sent_extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Templates (shape and dtype) of the tensors a valid reply of client ``partition`` holds.

        The server drops replies that miss one of these keys or hold it in another
        shape or dtype (``fl/validation.py``). Default: the server's own state plus the
        extras it sent down last round. Methods whose clients legitimately send other
        shapes (a smaller LoRA rank per client) override this.
        """
        return {**self.get_state(model), **sent_extras}

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
        losses: list[float] = []
        for batch in batches:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        return LocalResult(
            state=self.get_state(model), num_examples=config.num_examples, train_loss=sum(losses) / max(len(losses), 1)
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

    def restore_extras(self, model: nn.Module, extras: Mapping[str, torch.Tensor]) -> None:  # noqa: B027 (optional hook)
        """Re-apply, on resume, the extras the server last sent down (saved in the checkpoint; e.g. FLoRA's merged ΔW)."""
