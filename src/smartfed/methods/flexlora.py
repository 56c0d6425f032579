"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024).

Clients of budget β train a LoRA of rank ``r_c = max(1, ⌊β·r⌋)``. The server
averages the full-size products ``ΔW_k = B_k A_k`` by examples and takes the
SVD ``ΔW = U S Vᵀ``; the global factors are ``B = U_r √S_r``, ``A = √S_r V_rᵀ``
(r = ``--lora_rank``, the largest client rank), ordered by singular value. A
client keeps their leading r_c components, which is the truncated SVD at r_c:
the best rank-r_c approximation of ΔW in Frobenius norm (Eckart–Young).

Deviation: the paper keeps the full ΔW as the global model; here the server
keeps (and evaluates) its rank-r SVD. No client can use more than rank r, so
only the server's score can differ, and the share of ΔW's energy that rank r
keeps is logged per round (``flexlora_energy_kept``, the minimum over matrices).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .aggregation import Combine, weighted_mean
from .base import ClientUpdate, ServerUpdate
from .lora_common import RankedLoraMethod, a_keys, b_key
from .registry import register_method

ENERGY_KEPT = "flexlora.energy_kept"


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (rank, d_in), B (d_out, rank), energy kept) of the truncated SVD of ``delta``.

    B·A is the best rank-``rank`` approximation of ``delta`` (Eckart–Young); √S
    goes to both factors so neither dominates the next local optimisation. A
    matrix of smaller rank than ``rank`` gets zero trailing components.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = delta.new_zeros(rank, delta.shape[1])
    b = delta.new_zeros(delta.shape[0], rank)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    total = s.pow(2).sum()
    kept = s[:k].pow(2).sum() / total if total > 0 else torch.ones((), dtype=s.dtype)
    return a, b, kept


@register_method
class FlexLoRA(RankedLoraMethod):
    name = "flexlora"
    summary = "FlexLoRA: client ranks from β; server averages ΔW=BA, SVD back to each client's rank."

    def aggregate(self, updates: Sequence[ClientUpdate], combine: Combine = weighted_mean) -> dict[str, torch.Tensor]:
        keys = a_keys(updates[0].arrays)
        # ΔW_k per matrix (float64): products of different ranks have one shape, so any combine applies
        products = [{k: u.arrays[b_key(k)].double() @ u.arrays[k].double() for k in keys} for u in updates]
        mean = combine(products, [float(u.num_examples) for u in updates])
        out: dict[str, torch.Tensor] = {}
        kept = []
        for key in keys:
            a, b, energy = svd_factors(mean[key], self.config.lora_rank)
            dtype = updates[0].arrays[key].dtype
            out[key], out[b_key(key)] = a.to(dtype), b.to(dtype)
            kept.append(energy)
        out[ENERGY_KEPT] = torch.stack(kept).min().reshape(1).float()
        return out

    def server_update(self, server_round: int, model: nn.Module, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        update = ServerUpdate()  # nothing beside the state goes down
        if ENERGY_KEPT in extras:
            update.log["flexlora_energy_kept"] = float(extras[ENERGY_KEPT])
        return update
