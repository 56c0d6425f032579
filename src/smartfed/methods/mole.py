"""MoLE baseline: one learned gate per transformer layer over whole LoRA adapters.

Wu, Huang & Wei, "Mixture of LoRA Experts" (ICLR 2024): the adapters of a pool
stay frozen and whole; every layer gets a small gating function that mixes
them per token, ``y = W0 x + Σ_n ε_n(x) · s_n B_n A_n x`` with
``ε = softmax(W_ℓ · x̂ / τ)`` (x̂: the layer's input hidden state, RMS-normalised
as MoLE normalises before gating). Here the gates are trained federatedly
exactly as SmartFed trains its routers: clients run AdamW on the gates, the
server averages them by examples (FedAvg).

Differences from the paper: the gate reads the decoder block's input (one
gate shared by every adapted matrix of the block) instead of the concatenated
expert outputs, and the load-balancing loss is left out (the routers of the
other methods have none either, so the comparison stays about granularity).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..more import LoraPool, PoolModule
from ..more.layer import base_layer_features
from ..run.config import RunConfig
from .base import Method, parse_options
from .registry import register_method

# "model.layers.3.self_attn.q_proj" -> "model.layers.3"; "transformer.h.0.attn.c_attn" -> "transformer.h.0"
_LAYER = re.compile(r"^(?P<layer>.*?\.\d+)\.")
GATES_ATTRIBUTE = "mole_gates"


def layer_of(module_name: str) -> str:
    """The decoder block that holds ``module_name`` (the prefix up to its first numeric component)."""
    match = _LAYER.match(module_name)
    if match is None:
        raise ValueError(f"module {module_name!r} is not inside a numbered layer (expected e.g. 'model.layers.0.…')")
    return match["layer"]


class AdapterGatedLinear(nn.Module):
    """A frozen base matrix plus whole pool adapters weighted by per-adapter gates.

    ``y = W0 x + B_s (g[adapter_index] ⊙ A x)``: the pool's stacked rank-one
    experts with one gate per *adapter*, broadcast to that adapter's ranks (one
    matmul down, one up, as in ``MoreLinear``). ``gate_source()`` returns the
    gates ``(..., N)`` over the pool's N adapters for the current input.
    """

    def __init__(self, base_layer: nn.Module, experts: PoolModule, gate_source) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.register_buffer("lora_A", experts.A.to(weight.device, dtype), persistent=False)  # (M, d_in)
        self.register_buffer(
            "lora_B", (experts.B * experts.scale).to(weight.device, dtype), persistent=False
        )  # (d_out, M), s folded in
        self.register_buffer("adapter_index", experts.adapter_index.to(weight.device), persistent=False)  # (M,)
        self.gate_source = gate_source

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        z = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., M)
        gates = self.gate_source(x)  # (..., N)
        h = z * gates.index_select(-1, self.adapter_index).to(z.dtype)  # each rank takes its adapter's gate
        return result + F.linear(h, self.lora_B).to(result.dtype)


class LayerGate(nn.Module):
    """MoLE's gate of one decoder block: ``ε(h) = softmax(W ĥ + b) / τ`` over the N adapters."""

    def __init__(self, num_adapters: int, hidden_size: int, *, temperature: float, scaled: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_adapters, hidden_size))  # zero: every adapter equal at start
        self.bias = nn.Parameter(torch.zeros(num_adapters))
        self.temperature = temperature
        self.scaled = scaled
        self.current: torch.Tensor | None = None  # gates of the block input now flowing through the block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMS-normalised: gate sees direction
        gates = torch.softmax(F.linear(h, self.weight, self.bias) / self.temperature, dim=-1)
        return gates * gates.shape[-1] if self.scaled else gates

    def read(self, x: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("MoLE gate used outside its decoder block's forward")
        return self.current


@dataclass
class MoleOptions:
    """``--method_options`` of ``mole``."""

    temperature: float = 1.0  # τ of the gate's softmax
    scaled: bool = False  # N·softmax (a zero gate = the sum of the adapters, MoRE's convention) instead of softmax

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"mole: temperature={self.temperature!r} must be > 0")


class GatedAdapterMethod(Method):
    """Shared plumbing of the methods whose only trainable tensors are gates over pool adapters.

    The gates live in an ``nn.ModuleDict`` attached to the model as ``gates_attribute``;
    the state is their parameters, FedAvg'd by the default ``aggregate``.
    """

    gates_attribute: str

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def gates(self, model: nn.Module) -> nn.ModuleDict:
        return getattr(model, self.gates_attribute)

    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"{self.gates_attribute}.{name}": p.detach().clone() for name, p in self.gates(model).named_parameters()
        }

    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.gates(model).named_parameters())
        expected = {f"{self.gates_attribute}.{name}" for name in params}
        if set(state) != expected:
            raise ValueError(
                f"{self.name}: state keys {sorted(set(state) ^ expected)[:5]} do not match the model's gates"
            )
        with torch.no_grad():
            for name, param in params.items():
                value = state[f"{self.gates_attribute}.{name}"]
                if value.shape != param.shape:
                    raise ValueError(
                        f"{self.name}: {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                    )
                param.copy_(value)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self.gates(model).parameters())


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def checked_base_layer(model: nn.Module, pool: LoraPool, name: str) -> nn.Module:
    """The model's layer ``name``, checked to fit the pool's experts (same errors as ``attach_more``)."""
    try:
        layer = model.get_submodule(name)
        d_in, d_out = base_layer_features(layer)
    except (AttributeError, TypeError) as err:
        raise ValueError(f"pool module {name!r}: not a Linear/Conv1D of this model ({err})") from None
    experts = pool.modules[name]
    if (d_in, d_out) != (experts.in_features, experts.out_features):
        raise ValueError(
            f"pool module {name!r}: experts are (d_in, d_out) = {(experts.in_features, experts.out_features)}, "
            f"the model's layer is {(d_in, d_out)} (adapters trained for another base model?)"
        )
    return layer


@register_method
class MoLE(GatedAdapterMethod):
    name = "mole"
    summary = "MoLE: one trainable gate per layer over whole pool adapters (frozen); gates FedAvg'd like routers."
    gates_attribute = GATES_ATTRIBUTE

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.options = parse_options(MoleOptions, config.method_options, method=self.name)

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        if pool is None:
            raise ValueError("method 'mole' needs --lora_pool")
        freeze(model)
        hidden = getattr(model.config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(f"mole: the model config has no integer hidden_size ({hidden!r})")
        gates = nn.ModuleDict()
        for name in pool.module_names:
            layer = layer_of(name)
            key = layer.replace(".", "_")  # ModuleDict keys cannot hold dots
            if key not in gates:
                gate = gates[key] = LayerGate(
                    len(pool), hidden, temperature=self.options.temperature, scaled=self.options.scaled
                )
                block = model.get_submodule(layer)
                block.register_forward_pre_hook(_open_gate(gate), with_kwargs=True)
                block.register_forward_hook(_close_gate(gate))
            base = checked_base_layer(model, pool, name)
            replace_module(model, name, AdapterGatedLinear(base, pool.modules[name], gates[key].read))
        model.add_module(self.gates_attribute, gates)
        return model


def _open_gate(gate: LayerGate):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        gate.current = gate(hidden)

    return hook


def _close_gate(gate: LayerGate):
    def hook(module: nn.Module, args: tuple, output) -> None:
        gate.current = None  # drop the graph reference once the block is done

    return hook
