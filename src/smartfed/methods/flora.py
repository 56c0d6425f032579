"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024).

Each round every sampled client trains a fresh LoRA of its rank
``r_c = max(1, ⌊β·r⌋)``. The server stacks them, ``A = [p_1 A_1; …; p_K A_K]``
and ``B = [B_1, …, B_K]``, so that ``B·A = Σ_k p_k B_k A_k`` exactly (no
cross terms, unlike averaging A and B separately; no noise added) and merges
``s·B·A`` into the base weights; the next round starts from fresh LoRAs on
the merged model.

What travels: clients send their rank-r_c factors (the state; the server's
own factors are only a fresh LoRA's init). Beside the state the server sends
the *cumulative* merged update ΔW, one dense ``d_out × d_in`` matrix per
target, because a client may run in a fresh process, may have missed rounds,
and one simulation process serves many clients with one model; so a client
rebuilds ``W = W0 + ΔW`` from a kept copy of the original W0 (idempotent)
instead of adding to whatever the shared model holds. The bytes down count
those dense matrices; the paper's clients, which keep their merged model,
would receive only each round's stacked factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..more import LoraPool
from ..run.seeds import derive_seed
from .aggregation import Combine, weighted_mean
from .base import ClientUpdate, LocalTrainConfig, ServerUpdate
from .lora_common import (
    RankedLoraMethod,
    a_keys,
    b_key,
    client_rank,
    lora_layers,
    lora_state,
    mask_rank,
    module_of,
    reset_lora,
)
from .registry import register_method

DELTA_SUFFIX = ".flora_delta"  # extra sent down: <module>.flora_delta, the cumulative merged s·B·A
STACKED_RANK = "flora.stacked_rank"


def stack_lora(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: (A = [p_k A_k] stacked on the rank axis, B = [B_k] side by side), p_k = w_k / Σw.

    ``B @ A == Σ_k p_k B_k A_k`` for any ranks r_k (the rank axis is summed over).
    """
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"stacking weights sum to {total}; they must be positive")
    stacked_a = torch.cat([a_k.double() * (w / total) for a_k, w in zip(a, weights, strict=True)], dim=0)
    stacked_b = torch.cat([b_k.double() for b_k in b], dim=1)
    return stacked_a, stacked_b


@register_method
class FLoRA(RankedLoraMethod):
    name = "flora"
    summary = "FLoRA: fresh LoRAs each round, stacked exactly (sum of p_k B_k A_k) and merged into the base."

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        peft_model = super().build(model, pool, generator)
        with torch.no_grad():
            for layer in lora_layers(peft_model).values():
                weight = layer.get_base_layer().weight
                # W0 and ΔW live on the layer (not saved), so every copy of the model carries its own
                layer.register_buffer("flora_w0", weight.detach().clone(), persistent=False)
                layer.register_buffer("flora_delta", torch.zeros_like(weight), persistent=False)
        self._global = peft_model  # the server's model: aggregation adds this round's stack to its ΔW
        return peft_model

    def _apply_delta(self, model: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
        """W = W0 + ΔW for every target (ΔW = 0 where absent): from the kept W0, so applying twice changes nothing."""
        layers = lora_layers(model)
        unknown = sorted(set(delta) - {name + DELTA_SUFFIX for name in layers})
        if unknown:
            raise ValueError(f"flora merged update: unknown key(s) {unknown[:3]}")
        with torch.no_grad():
            for name, layer in layers.items():
                value = delta.get(name + DELTA_SUFFIX)
                if value is None:
                    layer.flora_delta.zero_()
                elif value.shape != layer.flora_w0.shape:
                    raise ValueError(
                        f"flora merged update: {name} ΔW is {tuple(value.shape)}, W is {tuple(layer.flora_w0.shape)}"
                    )
                else:
                    layer.flora_delta.copy_(value)
                layer.get_base_layer().weight.copy_(layer.flora_w0 + layer.flora_delta)

    def merged_delta(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The cumulative merged ΔW per target, ``<module>.flora_delta`` (CPU copies: aggregation adds the replies)."""
        return {
            name + DELTA_SUFFIX: layer.flora_delta.to("cpu", copy=True) for name, layer in lora_layers(model).items()
        }

    def prepare_round(
        self,
        model: nn.Module,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        self._apply_delta(model, {k: v for k, v in extras.items() if k.endswith(DELTA_SUFFIX)})
        # a fresh LoRA per (round, client), the same in any process
        seed = derive_seed(self.config.seed, "flora", config.server_round, config.partition)
        reset_lora(model, torch.Generator().manual_seed(seed))
        mask_rank(model, client_rank(self.config.lora_rank, config.budget))

    def aggregate(self, updates: Sequence[ClientUpdate], combine: Combine = weighted_mean) -> dict[str, torch.Tensor]:
        scaling = self.config.lora_alpha / self.config.lora_rank
        weights = [float(u.num_examples) for u in updates]
        previous = self.merged_delta(self._global)  # the server model holds the ΔW it sent down
        out = lora_state(self._global)  # the state is a fresh LoRA's init: it stays as it is
        for key in a_keys(updates[0].arrays):
            if combine is weighted_mean:  # FLoRA proper: the stacked factors
                a, b = stack_lora([u.arrays[key] for u in updates], [u.arrays[b_key(key)] for u in updates], weights)
                update = scaling * (b @ a)
            else:  # a robust combine (median, trimmed mean) of the clients' products instead of their stack
                products = [{key: u.arrays[b_key(key)].double() @ u.arrays[key].double()} for u in updates]
                update = scaling * combine(products, weights)[key]
            delta_key = module_of(key) + DELTA_SUFFIX
            out[delta_key] = (previous[delta_key].double() + update).to(previous[delta_key].dtype)
        out[STACKED_RANK] = torch.tensor([float(sum(u.arrays[a_keys(u.arrays)[0]].shape[0] for u in updates))])
        return out

    def server_update(self, server_round: int, model: nn.Module, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        delta = {k: v for k, v in extras.items() if k.endswith(DELTA_SUFFIX)}
        self._apply_delta(model, delta)  # the server scores W0 + ΔW
        update = ServerUpdate(extras=delta)  # sent down beside the state, saved in the checkpoint
        if STACKED_RANK in extras:
            update.log["flora_stacked_rank"] = int(extras[STACKED_RANK])
        return update

    def restore_extras(self, model: nn.Module, extras: Mapping[str, torch.Tensor]) -> None:
        self._apply_delta(model, {k: v for k, v in extras.items() if k.endswith(DELTA_SUFFIX)})
