"""Configuration of a Mixture of Rank-wise Experts (MoRE).

SmartFed (Wu et al., 2025; docs/design.md §1) cuts every LoRA adapter of a pool into
rank-one experts and puts a small trainable router in front of them, per target
matrix. This dataclass holds every choice of that layer, in the style of PEFT's
``LoraConfig``: plain fields with ``help`` metadata, validated on construction.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Literal, get_args

import torch

RouterType = Literal["linear", "rank"]
GateType = Literal["scaled_softmax", "softmax", "sigmoid"]
RouterInit = Literal["zeros", "normal"]
RankInput = Literal["matched", "raw"]
RouterDtype = Literal["float32", "bfloat16", "float16"]
ExpertDtype = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_choice(name: str, value: object, choices_type: object) -> None:
    choices = get_args(choices_type)
    if value not in choices:
        raise ValueError(f"MoreConfig.{name}={value!r} is not one of {list(choices)}")


@dataclass
class MoreConfig:
    """How the rank-one experts of a LoRA pool are routed.

    A rank-r LoRA update ``B A x`` equals the sum of its r rank-one pieces
    ``B[:, i] A[i] x``; MoRE keeps the ``top_k`` pieces per token, weighted by the
    gates of a trainable router (SmartFed, Wu et al., 2025).
    """

    top_k: int | None = field(
        default=8,
        metadata={
            "help": "Experts kept per token in every target matrix (the quota K_t; "
            "EEQA changes it per matrix with `set_quotas`). None keeps all experts "
            "(a dense router). The paper uses 32 with rank-32 adapters."
        },
    )
    router: RouterType = field(
        default="linear",
        metadata={
            "help": "'linear': logits = W_r x with W_r (M, d_in) on the layer input; "
            "'rank': logits = W_r (A x) with W_r (M, M) on the rank-space activations, "
            "d_in/M times fewer trainable parameters."
        },
    )
    rank_input: RankInput = field(
        default="matched",
        metadata={
            "help": "What the 'rank' router reads: 'matched' = c·(A x) with c = ‖x‖₁/‖A x‖₁ per token (a "
            "constant of the graph), so its logits move as fast as the linear router's at one learning rate; "
            "'raw' = A x (about 10× slower on SmolLM2)."
        },
    )
    gate: GateType = field(
        default="scaled_softmax",
        metadata={
            "help": "'scaled_softmax': K * softmax over the kept logits, so a zero router "
            "with K = M reproduces the sum of the adapters exactly; 'softmax': plain "
            "softmax over the kept logits (shrinks the update ~K times); 'sigmoid': "
            "independent sigmoid gates on the kept logits."
        },
    )
    router_init: RouterInit = field(
        default="normal",
        metadata={
            "help": "'normal' (std router_init_std, drawn from the generator given to attach_more): every token "
            "ranks the experts differently from the start. 'zeros': all logits are equal, so top-K (K < M) keeps "
            "the same last K experts of the pool for every token and the others never get a gradient; it is the "
            "start where K = M with uniform gates equals the sum of the adapters."
        },
    )
    router_init_std: float = field(
        default=0.02, metadata={"help": "Standard deviation of the 'normal' router initialisation."}
    )
    router_bias: bool = field(
        default=True,
        metadata={"help": "Give the router a per-expert bias (an input-independent prior on each expert)."},
    )
    router_dtype: RouterDtype = field(
        default="float32",
        metadata={"help": "dtype of the trainable router; float32 keeps its optimisation stable under a bf16 base."},
    )
    expert_dtype: ExpertDtype = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen stacked experts; 'auto' follows the wrapped layer's "
            "weight (float32 when that weight is quantised)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Restrict MoRE to these pool matrices: a list of name suffixes "
            "(e.g. ['q_proj']) or one regex matched against the full module name. "
            "None takes every matrix some adapter of the pool targets."
        },
    )

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"MoreConfig.top_k={self.top_k!r} must be a positive int or None")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"MoreConfig.top_k={self.top_k!r} must be >= 1")
        _check_choice("router", self.router, RouterType)
        _check_choice("gate", self.gate, GateType)
        _check_choice("rank_input", self.rank_input, RankInput)
        _check_choice("router_init", self.router_init, RouterInit)
        _check_choice("router_dtype", self.router_dtype, RouterDtype)
        _check_choice("expert_dtype", self.expert_dtype, ExpertDtype)
        if not isinstance(self.router_init_std, (int, float)) or not self.router_init_std > 0:
            raise ValueError(f"MoreConfig.router_init_std={self.router_init_std!r} must be a positive number")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(
                    f"MoreConfig.target_modules={self.target_modules!r} is not a valid regex: {err}"
                ) from err
        elif self.target_modules is not None:
            if not all(isinstance(m, str) and m for m in self.target_modules):
                raise ValueError(f"MoreConfig.target_modules={self.target_modules!r} must be non-empty strings")
            self.target_modules = list(self.target_modules)

    def selects(self, module_name: str) -> bool:
        """Whether the pool matrix ``module_name`` falls under ``target_modules``."""
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    @property
    def router_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.router_dtype]

    def expert_torch_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype experts are stored in, next to a base weight of ``weight_dtype``."""
        if self.expert_dtype != "auto":
            return _DTYPES[self.expert_dtype]
        return weight_dtype if weight_dtype.is_floating_point else torch.float32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoreConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoreConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class RoutingSpec:
    """How one MoRE matrix routes a call: every non-tensor input of its autograd functions, as one object.

    Built from a ``MoreConfig`` and the matrix's own ``top_k`` (its quota: EEQA and
    client budgets change it per matrix, see ``MoreModel.set_quotas``). Frozen, so a
    backward always reads the spec its forward ran with; changing ``top_k`` replaces
    the layer's spec (``with_top_k``).
    """

    top_k: int  # experts kept per token in this matrix
    gate: GateType  # a key of ``router.GATES``
    router_kind: RouterType  # what the router reads: "linear" x, "rank" z = A x
    match: bool  # the rank router reads c·z, c = ‖x‖₁/‖z‖₁ per token (rank_input="matched")
    base_norm: bool = False  # ``RoutedLinear`` also returns ‖W0 x + b0‖ per token (the expert statistics read it)

    @classmethod
    def from_config(cls, config: MoreConfig, top_k: int) -> RoutingSpec:
        return cls(
            top_k=top_k,
            gate=config.gate,
            router_kind=config.router,
            match=config.router == "rank" and config.rank_input == "matched",
        )

    def with_top_k(self, top_k: int) -> RoutingSpec:
        return replace(self, top_k=top_k)

    @cached_property
    def with_base_norm(self) -> RoutingSpec:
        """This spec with ``base_norm=True``, made once (a tracked forward reads it on every call)."""
        return replace(self, base_norm=True)
