"""Shared pieces of the knowledge-free baselines that train a LoRA from scratch (docs/design.md §6).

FedIT, FLoRA, FlexLoRA, HetLoRA and FedSA-LoRA all wrap the base model with a
PEFT LoRA (``get_peft_model``) and communicate its ``A (r, d_in)`` and
``B (d_out, r)`` factors under PEFT's own state-dict keys
(``<module>.lora_A.weight``, ``<module>.lora_B.weight``), so a state can be
loaded into a plain PEFT model with ``set_peft_model_state_dict``.

Heterogeneous ranks: every client model is built at the full ``lora_rank`` r
and a client of budget β uses only its first ``r_c = max(1, ⌊β·r⌋)`` rank
components. The other components are zeroed; since ``ΔW = s·B·A`` their
gradients are then exactly zero (∂/∂B_{:,j} ∝ A_j x, ∂/∂A_j ∝ B_{:,j}), and
AdamW keeps a zero parameter with a zero gradient at zero, so training a
masked rank-r LoRA is training a rank-r_c LoRA. All clients share the scale
s = α/r, so their ``B·A`` products live on the same scale and can be summed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..more import LoraPool
from ..run.config import RunConfig
from .base import LocalResult, LocalTrainConfig, Method

ADAPTER = "default"
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def target_modules(spec: str) -> list[str]:
    """``"q_proj, v_proj"`` (``--lora_target_modules``) → ``["q_proj", "v_proj"]``."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ValueError(f"lora_target_modules={spec!r} names no module")
    return names


def client_rank(rank: int, budget: float) -> int:
    """A client's rank under budget β: ``max(1, ⌊β·rank⌋)`` (FlexLoRA / HetLoRA / FLoRA heterogeneity)."""
    if not 0 < budget <= 1:
        raise ValueError(f"client budget β={budget!r} must be in (0, 1]")
    # the epsilon keeps β·r = 4 from becoming 3.9999999 and flooring to 3
    return max(1, math.floor(budget * rank + 1e-9))


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """PEFT LoRA layers by module name (the prefix of their state-dict keys), in module order."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
    if not layers:
        raise ValueError("the model has no PEFT LoRA layer (was it built by a LoRA method?)")
    return layers


def reset_lora(model: nn.Module, generator: torch.Generator) -> None:
    """PEFT's default init drawn from ``generator``: A ~ kaiming-uniform(a=√5), B = 0.

    The same generator state gives every process the same LoRA, which a global
    ``torch.manual_seed`` would not guarantee once other code draws from it.
    """
    with torch.no_grad():
        for layer in lora_layers(model).values():
            nn.init.kaiming_uniform_(layer.lora_A[ADAPTER].weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(layer.lora_B[ADAPTER].weight)


def build_lora_model(
    model: nn.Module, *, rank: int, alpha: float, targets: str, generator: torch.Generator
) -> PeftModel:
    """Wrap ``model`` with a PEFT LoRA (no dropout, so a rank mask stays exact), initialised from ``generator``."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules(targets), lora_dropout=0.0, bias="none")
    try:
        with torch.random.fork_rng(devices=[]):  # PEFT's own init draws from the global RNG: leave it untouched
            peft_model = get_peft_model(model, config)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_target_modules={targets!r}: {err}") from err
    reset_lora(peft_model, generator)
    return peft_model.eval()


def lora_scaling(model: nn.Module) -> float:
    """The LoRA scale s = α/r shared by every layer (ΔW = s·B·A)."""
    scales = {float(layer.scaling[ADAPTER]) for layer in lora_layers(model).values()}
    if len(scales) != 1:
        raise ValueError(f"LoRA layers have different scales {sorted(scales)}")
    return scales.pop()


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{<module>.lora_A.weight: A (r, d_in), <module>.lora_B.weight: B (d_out, r)}``, detached CPU copies.

    On the CPU whatever the model's device: the server combines them with the clients' replies.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state[name + A_SUFFIX] = layer.lora_A[ADAPTER].weight.detach().to("cpu", copy=True)
        state[name + B_SUFFIX] = layer.lora_B[ADAPTER].weight.detach().to("cpu", copy=True)
    return state


def a_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith(A_SUFFIX)]


def b_key(a_key: str) -> str:
    """The B key of the same module as ``a_key``."""
    return a_key.removesuffix(A_SUFFIX) + B_SUFFIX


def module_of(key: str) -> str:
    return key.removesuffix(A_SUFFIX).removesuffix(B_SUFFIX)


def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, strict: bool = True) -> None:
    """Copy ``state`` into the LoRA factors; a factor of lower rank fills the leading components, zeros the rest.

    ``strict`` requires every A and B of the model to be present.
    """
    params: dict[str, nn.Parameter] = {}
    for name, layer in lora_layers(model).items():
        params[name + A_SUFFIX] = layer.lora_A[ADAPTER].weight
        params[name + B_SUFFIX] = layer.lora_B[ADAPTER].weight
    unknown = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state)) if strict else []
    if unknown or missing:
        raise ValueError(f"{source}: unknown LoRA keys {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            param = params[key]
            rank_dim = 0 if key.endswith(A_SUFFIX) else 1
            other = 1 - rank_dim
            if (
                value.dim() != 2
                or value.shape[other] != param.shape[other]
                or value.shape[rank_dim] > param.shape[rank_dim]
            ):
                raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model's is {tuple(param.shape)}")
            param.zero_()
            param.narrow(rank_dim, 0, value.shape[rank_dim]).copy_(value)


def truncate_state(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The leading ``rank`` components: A[:rank], B[:, :rank] (what a rank-``rank`` client sends)."""
    return {k: (v[:rank] if k.endswith(A_SUFFIX) else v[:, :rank]).contiguous() for k, v in state.items()}


def mask_rank(model: nn.Module, rank: int) -> None:
    """Zero every component past ``rank`` so the model trains as a rank-``rank`` LoRA (see the module docstring)."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A[ADAPTER].weight[rank:].zero_()
            layer.lora_B[ADAPTER].weight[:, rank:].zero_()


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A of one matrix, in float64 (the aggregation rules compare products exactly)."""
    return scaling * (b.double() @ a.double())


class LoraMethod(Method):
    """A PEFT LoRA trained from scratch, its A and B communicated (FedIT's protocol; the others refine it)."""

    uses_pool = False  # a LoRA trained from scratch: the pool is not read

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        # the pool is not used: these baselines reuse no existing adapter
        c = self.config
        return build_lora_model(
            model, rank=c.lora_rank, alpha=c.lora_alpha, targets=c.lora_target_modules, generator=generator
        )

    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return lora_state(model)

    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_lora_state(model, state, source=f"{self.name} server state")

    def partition_rank(self, partition: int) -> int:
        """r_c of client ``partition`` from its ``--client_budgets`` β."""
        return client_rank(self.config.lora_rank, self.config.budgets()[partition])


class RankedLoraMethod(LoraMethod):
    """Clients of budget β train and send only the leading ``r_c = max(1, ⌊β·r⌋)`` components."""

    def prepare_round(
        self,
        model: nn.Module,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        mask_rank(model, client_rank(self.config.lora_rank, config.budget))

    def local_train(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        result = super().local_train(model, batches, config)
        # the factors, whatever the state sent down is (FLoRA's is the merged ΔW)
        result.state = truncate_state(lora_state(model), client_rank(self.config.lora_rank, config.budget))
        return result

    def expected_update(
        self, model: nn.Module, partition: int, sent_extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A valid reply holds the rank-r_c factors of that client (shape and dtype templates)."""
        return truncate_state(lora_state(model), self.partition_rank(partition))
