"""MoRE layer: a frozen base matrix plus top-K routed rank-one LoRA experts.

    y = W0 x + B_t · (s_t ⊙ g(x) ⊙ (A_t x))            (SmartFed, Wu et al., 2025; docs/design.md §1)

Vectorised like PEFT's ``poly`` tuner: the M experts are stacked, so the layer
does one matmul down (A_t) and one up (B_t), never a Python loop over experts.

Training-step cost is what decides whether a client prefers SmartFed to training
a LoRA, so the layer has a hand-written backward: composed of plain torch ops, autograd
would record about ten nodes per matrix and keep the logits, the kept logits and
their indices, the softmax output and several (tokens, M) products alive until
backward. Over a frozen ``nn.Linear`` (q_proj, v_proj of Llama or Qwen) the whole
layer is one node (``RoutedLinear``); over any other base (quantised, Conv1D,
hooked) the base runs as a module and the routed part is one node
(``RoutedRankSpace``). ``MoreLinear.forward_reference`` is the plain composition,
kept as the definition both are tested against (tests/test_more_fast_path.py).

The experts are the pool's tensors, not copies: A_t and the unscaled B_t share
the pool's storage (when dtype and device match), and the per-expert scale s_t
is applied to the (tokens, M) activations, which costs far less than a second,
scaled copy of B_t per matrix.

Every non-tensor input of the two autograd functions is one frozen ``RoutingSpec``
(top_k, gate, router kind; config.py), so their backward returns one gradient
(or None, for a frozen tensor) per tensor input and one None for the spec. The
per-expert statistics the layer feeds while ``track_stats`` is on live in stats.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .config import MoreConfig, RoutingSpec
from .pool import PoolModule
from .router import Router, rank_input_scale, top_k_gates, top_k_gates_backward
from .stats import STAT_SUMS, ExpertStats, token_norms


def base_layer_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear, a transformers Conv1D, or a quantised Linear."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    if type(layer).__name__ == "Conv1D":  # GPT-2 style: weight (d_in, d_out)
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"{type(layer).__name__} is neither an nn.Linear nor a Conv1D")


def _route(x, weight, bias, lora_A, scale, spec: RoutingSpec):
    """The routed rank space, forward: ``(features, z, logits, gates, h, c)`` with ``h = s ⊙ g ⊙ z``, ``z = A x``.

    ``c`` (T, 1): the rank router's per-token input scale when ``spec.match`` (``rank_input_scale``), else None.
    """
    z = x @ lora_A.t()  # (T, d_in) -> (T, M)
    c = None
    if spec.router_kind == "linear":
        features = x.to(weight.dtype)  # (T, d_in)
    elif spec.match:
        c = rank_input_scale(x, z)  # (T, 1)
        features = (z * c).to(weight.dtype)  # (T, M)
    else:
        features = z.to(weight.dtype)  # (T, M)
    # (T, F) -> (T, M)
    logits = features @ weight.t() if bias is None else torch.addmm(bias, features, weight.t())
    gates = top_k_gates(logits, spec.top_k, spec.gate)  # (T, M), top_k nonzero per row
    h = z * gates.to(z.dtype)
    h.mul_(scale)  # (T, M): s_m folded into column m
    return features, z, logits, gates, h, c


def _route_backward(ctx, grad_h, saved, needs: tuple[bool, bool, bool], grad_x=None):
    """Gradients of (x, router weight, router bias) from ``grad_h = ∂L/∂h (T, M)``.

    ``grad_x``: what other paths already give ∂L/∂x (T, d_in), added into in place, or None.
    """
    needs_x, needs_weight, needs_bias = needs
    features, weight, lora_A, scale, z, gates = saved
    grad_hs = grad_h * scale  # (T, M): ∂L/∂(g ⊙ z)
    grad_z = grad_hs * gates.to(grad_hs.dtype)  # (T, M): ∂L/∂z along h
    u = (grad_hs * z).to(gates.dtype).mul_(gates)  # (T, M): g ⊙ ∂L/∂g
    spec: RoutingSpec = ctx.spec
    grad_logits = top_k_gates_backward(u, gates, spec.top_k, spec.gate)  # (T, M)
    grad_weight = grad_logits.t() @ features if needs_weight else None  # (M, T) @ (T, F) -> (M, F)
    grad_bias = grad_logits.sum(0) if needs_bias else None  # (M,)
    if not needs_x:
        return None, grad_weight, grad_bias
    same = weight.dtype == grad_z.dtype
    if spec.router_kind == "rank" and ctx.rank_scale is not None:  # the logits read c z, c a constant per token
        grad_z += (grad_logits @ weight).mul_(ctx.rank_scale).to(grad_z.dtype)  # (T, M) @ (M, M) * (T, 1)
    elif spec.router_kind == "rank":  # the logits read z: their gradient joins z's before A
        if same:
            grad_z.addmm_(grad_logits, weight)  # (T, M) += (T, M) @ (M, M)
        else:
            grad_z += (grad_logits @ weight).to(grad_z.dtype)
    if grad_x is None:
        grad_x = grad_z @ lora_A  # (T, M) @ (M, d_in) -> (T, d_in)
    else:
        grad_x.addmm_(grad_z, lora_A)  # (T, d_in) += (T, M) @ (M, d_in)
    if spec.router_kind == "linear":  # the logits read x: add their gradient in the same buffer
        if same:
            grad_x.addmm_(grad_logits, weight)  # (T, d_in) += (T, M) @ (M, d_in)
        else:
            grad_x += (grad_logits @ weight).to(grad_x.dtype)
    return grad_x, grad_weight, grad_bias


class RoutedRankSpace(torch.autograd.Function):
    """The routed rank-space activations ``h = s ⊙ g ⊙ z`` with ``z = A x``, as one autograd node.

    Inputs: ``x (T, d_in)`` in the expert dtype; the router's ``weight (M, F)`` and
    ``bias (M,)`` (or None) in the router dtype, with ``F = d_in`` for the linear
    router (it reads x) and ``F = M`` for the rank router (it reads z); the frozen
    ``lora_A (M, d_in)`` and ``scale (M,)``; the ``RoutingSpec``. Outputs ``h (T, M)`` and, for the
    expert statistics, ``z (T, M)``, the logits and the gates ``g (T, M)`` (not differentiable;
    the logits are the forward's own tensor, returned without a copy).

    Why by hand: the backward needs only z, g and the router's input (x, which the
    LoRA this replaces saves too, or z itself). Each gate's derivative is a
    multiple of the gate (``top_k_gates_backward``), so dropped experts get exactly
    zero without the top-K indices; the gradient reaching x through the frozen A
    and through the router is one matmul plus one accumulating ``addmm_``; A and s
    get no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, scale, spec: RoutingSpec):
        features, z, logits, gates, h, c = _route(x, weight, bias, lora_A, scale, spec)
        ctx.save_for_backward(features, weight, lora_A, scale, z, gates)
        ctx.spec, ctx.rank_scale = spec, c
        ctx.mark_non_differentiable(z, logits, gates)
        ctx.set_materialize_grads(False)  # no zero tensors for the grads of z, logits and g, which never get one
        return h, z, logits, gates

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, _grad_z, _grad_logits, _grad_gates):
        if grad_h is None:
            return None, None, None, None, None, None
        grad_x, grad_weight, grad_bias = _route_backward(ctx, grad_h, ctx.saved_tensors, ctx.needs_input_grad[:3])
        # x, router weight and bias; lora_A and scale are frozen; the spec
        return grad_x, grad_weight, grad_bias, None, None, None


class RoutedLinear(torch.autograd.Function):
    """A whole MoRE layer over a frozen ``nn.Linear``: ``W0 x + b0 + B h`` as one autograd node.

    ``RoutedRankSpace`` leaves the base layer to autograd, which then sums the
    two gradients reaching x (through W0 and through the experts) in a third
    (T, d_in) tensor and copies W0 x into the output of ``addmm``. Here the routed
    update is added into W0 x in place, and the experts' share of ∂L/∂x is added
    into ``∂L/∂(W0 x) W0`` in place: two fewer passes over (T, d) tensors per
    matrix, the difference between this layer and a LoRA's being the routing.

    Extra inputs: the frozen ``expert_B (d_out, M)``, ``base_weight (d_out, d_in)``
    and ``base_bias (d_out,)`` or None. Outputs the layer's ``(T, d_out)``, z, the
    logits, the gates and, when ``spec.base_norm``, ``‖W0 x + b0‖`` per token (T,) for the expert
    statistics (else an empty tensor).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, scale, expert_B, base_weight, base_bias, spec: RoutingSpec):
        out = F.linear(x, base_weight, base_bias)  # (T, d_in) -> (T, d_out): the frozen base
        norm = token_norms(out) if spec.base_norm else out.new_empty(0)  # (T,) ‖W0 x + b0‖, before the experts
        features, z, logits, gates, h, c = _route(x, weight, bias, lora_A, scale, spec)
        out.addmm_(h, expert_B.t())  # (T, d_out) += (T, M) @ (M, d_out), into our own buffer
        ctx.save_for_backward(features, weight, lora_A, scale, z, gates, expert_B, base_weight)
        ctx.spec, ctx.rank_scale = spec, c
        ctx.mark_non_differentiable(z, logits, gates, norm)
        ctx.set_materialize_grads(False)
        return out, z, logits, gates, norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_z, _grad_logits, _grad_gates, _grad_norm):
        if grad_out is None:
            return None, None, None, None, None, None, None, None, None
        *saved, expert_B, base_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grad_h = grad_out @ expert_B  # (T, d_out) @ (d_out, M) -> (T, M)
        grad_x = grad_out @ base_weight if needs[0] else None  # (T, d_out) @ (d_out, d_in) -> (T, d_in)
        grad_x, grad_weight, grad_bias = _route_backward(ctx, grad_h, saved, needs, grad_x)
        # x, router weight and bias; lora_A, scale, expert_B, base_weight, base_bias are frozen; the spec
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


class MoreLinear(nn.Module):
    """Wraps one target matrix; only ``router`` is trainable."""

    #: Run the fused nodes: ``RoutedLinear`` over a frozen nn.Linear, else ``RoutedRankSpace`` for the
    #: routed part (False: ``forward_reference``'s plain ops).
    use_fused: bool = True

    #: Per-expert sums the statistics keep (each (M,) float64): see ``stats.ExpertStats.accumulate``.
    STAT_SUMS = STAT_SUMS

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
        self.num_experts = experts.num_experts
        self.routing = RoutingSpec.from_config(config, top_k)
        weight = base_layer.weight
        dtype = config.expert_torch_dtype(weight.dtype)
        device = weight.device
        # Frozen, non-persistent: the experts live in the pool files, not in checkpoints. ``.to`` returns the
        # pool's own tensor when dtype and device already match, so A and B are shared with the pool, not copied.
        self.register_buffer("lora_A", experts.A.to(device=device, dtype=dtype), persistent=False)  # (M, d_in)
        self.register_buffer("expert_B", experts.B.to(device=device, dtype=dtype), persistent=False)  # (d_out, M)
        self.register_buffer("expert_scale", experts.scale.to(device=device, dtype=dtype), persistent=False)  # (M,)
        self.register_buffer(
            "expert_norm",
            (experts.B * experts.scale).norm(dim=0).to(device=device, dtype=torch.float32),
            persistent=False,
        )  # (M,): ‖s_m B_m‖, which only the statistics read
        self.router = Router(self.num_experts, experts.in_features, config, device=device, generator=generator)
        self.statistics = ExpertStats(self.num_experts, device=device)
        self.track_stats = False
        self.stat_token_mask: torch.Tensor | None = None  # (batch, seq) attention mask while tracking

    @property
    def top_k(self) -> int:
        """Experts kept per token in this matrix (its quota, which EEQA and client budgets change)."""
        return self.routing.top_k

    @top_k.setter
    def top_k(self, top_k: int) -> None:
        self.routing = self.routing.with_top_k(top_k)

    @property
    def gate(self) -> str:
        return self.routing.gate

    @property
    def lora_B(self) -> torch.Tensor:
        """The scaled up-projection ``B_t · diag(s_t)`` (d_out, M), computed on demand (export, analysis)."""
        return self.expert_B * self.expert_scale

    # --- expert statistics (stats.py) ------------------------------------------
    def reset_stats(self) -> None:
        self.statistics.reset()

    def stats(self) -> dict[str, torch.Tensor | int]:
        """Means over the tokens seen since the last reset: each of ``STAT_SUMS`` (M,) and ``tokens``."""
        return self.statistics.means()

    def _accumulate(self, base_norm: torch.Tensor, z: torch.Tensor, logits: torch.Tensor, gates: torch.Tensor) -> None:
        self.statistics.accumulate(base_norm, z, logits, gates, self.expert_norm, self.stat_token_mask)

    # --- forward ---------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, logits, gates): z = A x (..., M) in the expert dtype, logits (..., M), gates with top_k nonzero."""
        z = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., d_in) -> (..., M)
        logits = self.router(x, z)  # (..., M) in the router dtype
        return z, logits, top_k_gates(logits, self.routing.top_k, self.routing.gate)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.use_fused:
            return self.forward_reference(x, *args, **kwargs)
        if not args and not kwargs and self._base_is_fusable(x):
            return self._forward_routed_linear(x)
        result = self.base_layer(x, *args, **kwargs)  # (..., d_out)
        x2d = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)  # (..., d_in) -> (T, d_in)
        h, z, logits, gates = RoutedRankSpace.apply(
            x2d, self.router.weight, self.router.bias, self.lora_A, self.expert_scale, self.routing
        )  # (T, M) each
        if self.track_stats:
            self._accumulate(token_norms(result), z, logits, gates)
        result2d = result.reshape(-1, result.shape[-1])  # (..., d_out) -> (T, d_out)
        if result2d.dtype == h.dtype:
            out = torch.addmm(result2d, h, self.expert_B.t())  # W0 x + B h: the add rides on the matmul
        else:
            out = result2d + F.linear(h, self.expert_B).to(result2d.dtype)
        return out.view(result.shape)  # (T, d_out) -> (..., d_out)

    def _base_is_fusable(self, x: torch.Tensor) -> bool:
        """Whether the base is a plain frozen ``nn.Linear`` that ``RoutedLinear`` can run itself.

        Anything else (quantised or Conv1D layers, subclasses, hooks such as
        accelerate's offloading, a trainable W0, mixed dtypes, autocast, which would
        hand the backward gradients in another dtype) is called as a module.
        """
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and base.weight.dtype == x.dtype == self.lora_A.dtype
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _forward_routed_linear(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # (..., d_in) -> (T, d_in)
        spec = self.routing.with_base_norm if self.track_stats else self.routing
        out, z, logits, gates, norm = RoutedLinear.apply(
            x2d,
            self.router.weight,
            self.router.bias,
            self.lora_A,
            self.expert_scale,
            self.expert_B,
            self.base_layer.weight,
            self.base_layer.bias,
            spec,
        )  # (T, d_out), (T, M), (T, M), (T, M), (T,)
        if self.track_stats:
            self._accumulate(norm, z, logits, gates)
        return out.view(*x.shape[:-1], out.shape[-1])  # (T, d_out) -> (..., d_out)

    def forward_reference(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The same layer from plain torch ops, every step recorded by autograd: what ``forward`` must equal."""
        result = self.base_layer(x, *args, **kwargs)  # (..., d_out)
        z, logits, gates = self.route(x)
        h = z * gates.to(z.dtype) * self.expert_scale  # (..., M): gated, scaled rank-space activations
        delta = F.linear(h, self.expert_B)  # (..., M) -> (..., d_out)
        if self.track_stats:
            self._accumulate(token_norms(result), z, logits, gates)
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        spec = self.routing
        return f"experts={self.num_experts}, top_k={spec.top_k}, gate={spec.gate!r}, router={spec.router_kind!r}"
