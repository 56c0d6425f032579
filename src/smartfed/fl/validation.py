"""Server-side checks of every client reply before it reaches aggregation.

A federation runs on machines nobody controls: a reply may be missing keys, carry
tensors of another shape or dtype, NaN/Inf, a huge norm (a scaled "boosting" attack,
Bhagoji et al., 2019), or nonsense metrics. Each such reply is dropped with a
one-line reason; the server logs (partition, node, reason) in metrics.jsonl.

What a valid reply holds comes from the method (``Method.expected_update``): by
default the server's own state plus the extras it sent down last round. Extras a
client sends before the server ever sent them (SmartFed's importance in round 1)
have no reference yet; they must then agree (keys, shapes, dtypes) with the
majority of the round's replies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..methods.aggregation import delta_norm


@dataclass
class Candidate:
    """One reply, decoded, before its checks."""

    partition: int
    node: int
    arrays: dict[str, torch.Tensor]
    num_examples: object
    train_loss: object
    reason: str | None = None  # set when rejected


@dataclass(frozen=True)
class ReplyRules:
    """What the server accepts this round."""

    expected: Mapping[str, torch.Tensor]  # key -> template (shape, dtype) every reply must hold
    reference: Mapping[str, torch.Tensor] = field(default_factory=dict)  # current global, for the delta norm
    max_update_norm: float = 0.0  # bound on ||update - reference||_2 (0: no bound)
    protected: frozenset[str] = frozenset()  # the state's keys: a client may not add them
    max_state_norm: float = 0.0  # bound on the state part of the delta alone (--dp client: the clipping norm)
    min_state_norm: float = 0.0  # --dp server: Flower's clipping divides by the delta norm, which must not be 0


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def check_candidate(candidate: Candidate, rules: ReplyRules) -> str | None:
    """Why this reply must be dropped, or None when it is acceptable (cross-reply checks aside)."""
    n = candidate.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"num-examples={n!r} is not a positive integer"
    loss = candidate.train_loss
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return f"train-loss={loss!r} is not a finite number"
    arrays = candidate.arrays
    missing = sorted(set(rules.expected) - set(arrays))
    if missing:
        return f"missing key(s) {missing[:3]}{'...' if len(missing) > 3 else ''}"
    for name, value in arrays.items():
        template = rules.expected.get(name)
        if template is None:
            if name in rules.protected:
                return f"unexpected key {name!r}"
            if not value.is_floating_point():
                return f"{name!r} has dtype {str(value.dtype).removeprefix('torch.')}, expected a float tensor"
        elif value.shape != template.shape or value.dtype != template.dtype:
            return f"{name!r} is {_describe(value)}, expected {_describe(template)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            return f"{name!r} has {bad} non-finite value(s)"
    if rules.max_update_norm > 0:
        norm = delta_norm(arrays, rules.reference)
        if not norm <= rules.max_update_norm:
            return f"update norm {norm:.4g} exceeds the bound {rules.max_update_norm:g} (--max_update_norm)"
    if rules.max_state_norm > 0 or rules.min_state_norm > 0:
        norm = delta_norm(arrays, {k: v for k, v in rules.reference.items() if k in rules.protected})
        if rules.max_state_norm > 0 and not norm <= rules.max_state_norm:
            return f"state update norm {norm:.4g} exceeds the DP clipping norm (the client did not clip)"
        if norm < rules.min_state_norm:
            return f"state update norm {norm:.3g} is ~0: nothing for DP clipping to scale"
    return None


def _signature(arrays: Mapping[str, torch.Tensor], keys: set[str]) -> tuple:
    return tuple(sorted((k, tuple(arrays[k].shape), str(arrays[k].dtype)) for k in keys))


def validate(candidates: Sequence[Candidate], rules: ReplyRules | Callable[[int], ReplyRules]) -> list[Candidate]:
    """Set ``reason`` on every bad candidate; returns the accepted ones, sorted by partition.

    ``rules`` may depend on the partition (per-client shapes). Keys without a
    template (new extras) must match the most common signature among the otherwise
    valid replies (ties: the one of the lowest partition), so that aggregation never
    sees differently shaped tensors under one name.
    """
    rules_of = rules if callable(rules) else (lambda _partition: rules)
    expected: dict[int, set[str]] = {}
    for c in candidates:
        r = rules_of(c.partition)
        expected[c.partition] = set(r.expected)
        c.reason = check_candidate(c, r)
    ok = sorted((c for c in candidates if c.reason is None), key=lambda c: c.partition)
    signatures = {c.partition: _signature(c.arrays, set(c.arrays) - expected[c.partition]) for c in ok}
    if len(set(signatures.values())) > 1:
        counts = Counter(signatures.values())
        top = max(counts.values())
        winner = next(s for s in signatures.values() if counts[s] == top)  # ok is sorted by partition
        for c in ok:
            if signatures[c.partition] != winner:
                c.reason = "its extra keys/shapes differ from the other clients' this round"
        ok = [c for c in ok if c.reason is None]
    return ok
