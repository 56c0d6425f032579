"""MoRE layer: a frozen base matrix plus top-K routed rank-one LoRA experts.

    y = W0 x + B_t · (s_t ⊙ g(x) ⊙ (A_t x))            (SmartFed, seed 001; DESIGN.md §1)

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .config import MoreConfig
from .pool import PoolModule
from .router import Router, rank_input_scale, top_k_gates, top_k_gates_backward


def base_layer_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear, a transformers Conv1D, or a quantised Linear."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    if type(layer).__name__ == "Conv1D":  # GPT-2 style: weight (d_in, d_out)
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"{type(layer).__name__} is neither an nn.Linear nor a Conv1D")


def _token_norms(result: torch.Tensor) -> torch.Tensor:
    """‖W0 x‖ per token: (..., d_out) -> (N,) float32."""
    return torch.linalg.vector_norm(result.detach().reshape(-1, result.shape[-1]), dim=-1, dtype=torch.float32)


def _route(x, weight, bias, lora_A, scale, top_k: int, gate: str, router_kind: str, match: bool):
    """The routed rank space, forward: ``(features, z, logits, gates, h, c)`` with ``h = s ⊙ g ⊙ z``, ``z = A x``.

    ``c`` (T, 1): the rank router's per-token input scale when ``match`` (``rank_input_scale``), else None.
    """
    z = x @ lora_A.t()  # (T, d_in) -> (T, M)
    c = None
    if router_kind == "linear":
        features = x.to(weight.dtype)  # (T, d_in)
    elif match:
        c = rank_input_scale(x, z)  # (T, 1)
        features = (z * c).to(weight.dtype)  # (T, M)
    else:
        features = z.to(weight.dtype)  # (T, M)
    # (T, F) -> (T, M)
    logits = features @ weight.t() if bias is None else torch.addmm(bias, features, weight.t())
    gates = top_k_gates(logits, top_k, gate)  # (T, M), top_k nonzero per row
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
    grad_logits = top_k_gates_backward(u, gates, ctx.top_k, ctx.gate)  # (T, M)
    grad_weight = grad_logits.t() @ features if needs_weight else None  # (M, T) @ (T, F) -> (M, F)
    grad_bias = grad_logits.sum(0) if needs_bias else None  # (M,)
    if not needs_x:
        return None, grad_weight, grad_bias
    same = weight.dtype == grad_z.dtype
    if ctx.router_kind == "rank" and ctx.rank_scale is not None:  # the logits read c z, c a constant per token
        grad_z += (grad_logits @ weight).mul_(ctx.rank_scale).to(grad_z.dtype)  # (T, M) @ (M, M) * (T, 1)
    elif ctx.router_kind == "rank":  # the logits read z: their gradient joins z's before A
        if same:
            grad_z.addmm_(grad_logits, weight)  # (T, M) += (T, M) @ (M, M)
        else:
            grad_z += (grad_logits @ weight).to(grad_z.dtype)
    if grad_x is None:
        grad_x = grad_z @ lora_A  # (T, M) @ (M, d_in) -> (T, d_in)
    else:
        grad_x.addmm_(grad_z, lora_A)  # (T, d_in) += (T, M) @ (M, d_in)
    if ctx.router_kind == "linear":  # the logits read x: add their gradient in the same buffer
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
    ``lora_A (M, d_in)`` and ``scale (M,)``. Outputs ``h (T, M)`` and, for the
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
    def forward(ctx, x, weight, bias, lora_A, scale, top_k: int, gate: str, router_kind: str, match: bool):
        features, z, logits, gates, h, c = _route(x, weight, bias, lora_A, scale, top_k, gate, router_kind, match)
        ctx.save_for_backward(features, weight, lora_A, scale, z, gates)
        ctx.top_k, ctx.gate, ctx.router_kind, ctx.rank_scale = top_k, gate, router_kind, c
        ctx.mark_non_differentiable(z, logits, gates)
        ctx.set_materialize_grads(False)  # no zero tensors for the grads of z, logits and g, which never get one
        return h, z, logits, gates

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, _grad_z, _grad_logits, _grad_gates):
        if grad_h is None:
            return (None,) * 9
        grads = _route_backward(ctx, grad_h, ctx.saved_tensors, ctx.needs_input_grad[:3])
        return *grads, None, None, None, None, None, None


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
    logits, the gates and, when ``want_norm``, ``‖W0 x + b0‖`` per token (T,) for the expert
    statistics (else an empty tensor).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, scale, expert_B, base_weight, base_bias, top_k: int, gate: str,
        router_kind: str, match: bool, want_norm: bool,
    ):  # fmt: skip
        out = F.linear(x, base_weight, base_bias)  # (T, d_in) -> (T, d_out): the frozen base
        norm = _token_norms(out) if want_norm else out.new_empty(0)  # (T,) ‖W0 x + b0‖, before the experts
        features, z, logits, gates, h, c = _route(x, weight, bias, lora_A, scale, top_k, gate, router_kind, match)
        out.addmm_(h, expert_B.t())  # (T, d_out) += (T, M) @ (M, d_out), into our own buffer
        ctx.save_for_backward(features, weight, lora_A, scale, z, gates, expert_B, base_weight)
        ctx.top_k, ctx.gate, ctx.router_kind, ctx.rank_scale = top_k, gate, router_kind, c
        ctx.mark_non_differentiable(z, logits, gates, norm)
        ctx.set_materialize_grads(False)
        return out, z, logits, gates, norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_z, _grad_logits, _grad_gates, _grad_norm):
        if grad_out is None:
            return (None,) * 13
        *saved, expert_B, base_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grad_h = grad_out @ expert_B  # (T, d_out) @ (d_out, M) -> (T, M)
        grad_x = grad_out @ base_weight if needs[0] else None  # (T, d_out) @ (d_out, d_in) -> (T, d_in)
        grads = _route_backward(ctx, grad_h, saved, needs, grad_x)
        return *grads, *(None,) * 10


class MoreLinear(nn.Module):
    """Wraps one target matrix; only ``router`` is trainable."""

    #: Run the fused nodes: ``RoutedLinear`` over a frozen nn.Linear, else ``RoutedRankSpace`` for the
    #: routed part (False: ``forward_reference``'s plain ops).
    use_fused: bool = True

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
        self.gate = config.gate
        self.num_experts = experts.num_experts
        self.top_k = top_k
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
        )  # (M,): ‖s_m B_m‖
        self.router = Router(self.num_experts, experts.in_features, config, device=device, generator=generator)
        self.track_stats = False
        self.stat_token_mask: torch.Tensor | None = None  # (batch, seq) attention mask while tracking
        self._init_stats()

    @property
    def lora_B(self) -> torch.Tensor:
        """The scaled up-projection ``B_t · diag(s_t)`` (d_out, M), computed on demand (export, analysis)."""
        return self.expert_B * self.expert_scale

    #: Per-expert sums the statistics keep (each (M,) float64): see ``_accumulate``.
    STAT_SUMS = ("gate_mass", "contribution", "prob_contribution", "gated_contribution")

    def _init_stats(self) -> None:
        device = self.lora_A.device
        for key in self.STAT_SUMS:
            self.register_buffer(
                f"stat_{key}", torch.zeros(self.num_experts, dtype=torch.float64, device=device), persistent=False
            )
        self.register_buffer("stat_tokens", torch.zeros((), dtype=torch.float64, device=device), persistent=False)

    def reset_stats(self) -> None:
        for key in self.STAT_SUMS:
            getattr(self, f"stat_{key}").zero_()
        self.stat_tokens.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, logits, gates): z = A x (..., M) in the expert dtype, logits (..., M), gates with top_k nonzero."""
        z = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., d_in) -> (..., M)
        logits = self.router(x, z)  # (..., M) in the router dtype
        return z, logits, top_k_gates(logits, self.top_k, self.gate)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.use_fused:
            return self.forward_reference(x, *args, **kwargs)
        if not args and not kwargs and self._base_is_fusable(x):
            return self._forward_routed_linear(x)
        result = self.base_layer(x, *args, **kwargs)  # (..., d_out)
        x2d = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)  # (..., d_in) -> (T, d_in)
        h, z, logits, gates = RoutedRankSpace.apply(
            x2d,
            self.router.weight,
            self.router.bias,
            self.lora_A,
            self.expert_scale,
            self.top_k,
            self.gate,
            self.router.kind,
            self.router.match,
        )  # (T, M) each
        if self.track_stats:
            self._accumulate(_token_norms(result), z, logits, gates)
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
        out, z, logits, gates, norm = RoutedLinear.apply(
            x2d,
            self.router.weight,
            self.router.bias,
            self.lora_A,
            self.expert_scale,
            self.expert_B,
            self.base_layer.weight,
            self.base_layer.bias,
            self.top_k,
            self.gate,
            self.router.kind,
            self.router.match,
            self.track_stats,
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
            self._accumulate(_token_norms(result), z, logits, gates)
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def _accumulate(self, base_norm: torch.Tensor, z: torch.Tensor, logits: torch.Tensor, gates: torch.Tensor) -> None:
        """Per expert m, summed over tokens (DESIGN.md §2), with ``c_m(x) = ‖s_m B_m‖ |A_m x| / ‖W0 x‖``:

        - ``gate_mass``: g_m(x), the kept gate;
        - ``contribution``: c_m(x), what the expert would add, kept or not;
        - ``prob_contribution``: p_m(x) c_m(x) with p the softmax over *all* M logits: the router's
          preference times the size of the expert's output, for every expert, kept or not;
        - ``gated_contribution``: g_m(x) c_m(x), zero for an expert that is never kept (the first EEQA
          importance, which feeds on its own quota: a matrix at K_t = 1 scores one expert).

        ``base_norm``: ‖W0 x‖ per token (N,), float32. The sums over tokens are vector-matrix
        products with a per-token weight (1 / ‖W0 x‖, times 0 for padding), not a boolean
        selection that copies.
        """
        m = self.num_experts
        g = gates.detach().float().reshape(-1, m)  # (N, M)
        p = torch.softmax(logits.detach().float().reshape(-1, m), dim=-1)  # (N, M) over all experts
        # ‖b_m (a_m)‖ = |a_m| ‖b_m‖: the norm of a rank-one output without forming it.
        c = z.detach().abs().float().reshape(-1, m).mul_(self.expert_norm)  # (N, M), a copy: written below
        weight = base_norm.clamp_min(1e-6).reciprocal_()  # (N,)
        mask = self.stat_token_mask
        if mask is not None and mask.numel() == g.shape[0]:  # padding tokens say nothing about the task
            keep = mask.reshape(-1).ne(0).float()  # (N,) 1 for a real token, 0 for padding
            weight.mul_(keep)
            self.stat_gate_mass.add_(keep @ g)  # (N,) @ (N, M) -> (M,), added into the float64 sum in place
            self.stat_tokens.add_(keep.sum())
        else:
            self.stat_gate_mass.add_(g.sum(0))
            self.stat_tokens.add_(g.shape[0])
        self.stat_contribution.add_(weight @ c)  # (N,) @ (N, M) -> (M,)
        self.stat_prob_contribution.add_(weight @ (p * c))
        self.stat_gated_contribution.add_(weight @ c.mul_(g))

    def stats(self) -> dict[str, torch.Tensor | int]:
        """Means over the tokens seen since the last reset: each of ``STAT_SUMS`` (M,) and ``tokens``."""
        tokens = max(float(self.stat_tokens), 1.0)
        out: dict[str, torch.Tensor | int] = {
            key: (getattr(self, f"stat_{key}") / tokens).float().cpu() for key in self.STAT_SUMS
        }
        out["tokens"] = int(self.stat_tokens)
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, gate={self.gate!r}, router={self.router.kind!r}"
