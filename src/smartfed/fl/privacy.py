"""Central differential privacy of the communicated state, with Flower's fixed-clipping wrappers.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language
Models"; Andrew et al., 2021 for the client-side variant): every client's delta from
the global state is clipped to L2 norm ``C``; the server averages the clipped states
with equal weights and adds Gaussian noise of std ``z·C/n`` (``n`` = sampled clients)
to the aggregate, i.e. to the global update. Flower 1.41 provides the two wrappers
used here unchanged:

- ``--dp server``: ``DifferentialPrivacyServerSideFixedClipping`` clips on the server
  (the server sees raw updates; protects the released model against anyone who sees it).
- ``--dp client``: ``DifferentialPrivacyClientSideFixedClipping`` sends ``C`` down; each
  client clips with Flower's ``compute_clip_model_update`` before sending (the server
  checks the bound and drops replies that exceed it).

Only the method's *state* (SmartFed: the routers) is clipped and noised. A method's
extras (SmartFed's per-expert importance) are aggregated as usual and are **not**
private; docs/reliability.md says so.

Accounting: client-level (add/remove one client's round contribution), no
amplification by sampling. A round whose mean is over ``m < n`` valid replies has
sensitivity ``C/m`` for noise ``z·C/n``: its effective multiplier is ``z·m/n``. The
composition of Gaussian mechanisms is exactly ``μ``-GDP with ``μ = sqrt(Σ 1/z_t²)``
(Dong, Roth & Su, 2022, Cor. 3.3), and ``μ``-GDP gives (ε, δ(ε))-DP with
``δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`` (ibid., Cor. 2.13); ε is solved for the
configured δ. Nothing else (extras, metrics, eval) is accounted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update, compute_stdv

from ..run.config import RunConfig

__all__ = ["KEY_CLIPPING_NORM", "clip_state", "dp_strategy", "epsilon", "round_log"]


def dp_strategy(strategy: Strategy, config: RunConfig) -> Strategy:
    """``strategy`` wrapped in Flower's DP wrapper of ``config.dp`` (itself when 'none')."""
    if config.dp == "none":
        return strategy
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if config.dp == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(strategy, config.dp_noise_multiplier, config.dp_clipping_norm, config.sample_clients)


def clip_state(
    state: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], clipping_norm: float
) -> dict[str, torch.Tensor]:
    """Client side: ``received + clip(state − received, C)`` with Flower's ``compute_clip_model_update``."""
    names = list(received)
    update = [state[k].detach().cpu().numpy().copy() for k in names]
    previous = [received[k].detach().cpu().numpy() for k in names]
    if not any(np.any(u != p) for u, p in zip(update, previous, strict=True)):
        return {k: state[k] for k in names}  # zero delta: nothing to clip (Flower's clip divides by the norm)
    compute_clip_model_update(update, previous, clipping_norm)
    return {k: torch.from_numpy(np.ascontiguousarray(u)).to(state[k].dtype) for k, u in zip(names, update, strict=True)}


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _delta_of_epsilon(eps: float, mu: float) -> float:
    return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)


def epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """ε at ``delta`` after Gaussian releases with these (effective) noise multipliers; inf if any is 0."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    mu = math.sqrt(sum(1.0 / z**2 for z in noise_multipliers))
    if _delta_of_epsilon(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _delta_of_epsilon(hi, mu) > delta:  # δ(ε) decreases in ε
        hi *= 2
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _delta_of_epsilon(mid, mu) > delta else (lo, mid)
    return hi


def round_log(config: RunConfig, replies: int, history: Sequence[float]) -> tuple[dict[str, object], float]:
    """(metrics entry, this round's effective multiplier) for a round averaged over ``replies`` clients."""
    z_eff = config.dp_noise_multiplier * replies / config.sample_clients
    eps = epsilon([*history, z_eff], config.dp_delta)
    entry = {
        "mode": config.dp,
        "clipping_norm": config.dp_clipping_norm,
        "noise_multiplier": config.dp_noise_multiplier,
        "noise_std": compute_stdv(config.dp_noise_multiplier, config.dp_clipping_norm, config.sample_clients),
        "noise_multiplier_effective": z_eff,
        "epsilon": eps if math.isfinite(eps) else None,  # JSON has no inf: None = no guarantee
        "delta": config.dp_delta,
    }
    return entry, z_eff
