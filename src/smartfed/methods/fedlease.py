"""FedLEASE baseline: clustered LoRA experts with an adaptive top-M router.

Xu, Bian, Wang & Zhang, "Adaptive LoRA Experts Allocation and Selection for
Federated Fine-Tuning" (NeurIPS 2025, arXiv 2509.15087):

1. Warm-up: every client trains its own LoRA (rank ``--lora_rank``, α
   ``--lora_alpha``, on ``--lora_target_modules``) for ``warmup_rounds`` rounds,
   kept on the client between rounds (private state).
2. Allocation: after the last warm-up round the server clusters the clients
   that sent their LoRA, agglomeratively on the cosine distance of their
   (flattened) B matrices, and silhouette picks the number of clusters M in
   ``2..max_clusters``. Expert j starts as the example-weighted mean of its
   cluster's LoRAs.
3. Selection: a client of cluster c routes over all M experts with a router of
   ``2M − 1`` outputs: M of them all stand for its own expert, M − 1 for the
   others. The top M of the 2M − 1 logits are kept and softmax-weighted; with
   only M − 1 "other" outputs, at least one kept output is the client's own,
   so its expert is always used and the number of other experts it mixes in
   (0..M − 1) is chosen per token.
4. Training: a client trains its cluster's expert and its cluster's router;
   the server averages each expert and each router over the clients of its
   cluster (per-cluster FedAvg, by examples).

Choices the paper leaves open or that the runtime forces, documented here:

- Only the clients sampled in the last warm-up round are clustered (Flower
  samples ``--sample_clients`` per round; with fewer than 3 of them
  silhouette is undefined and all form one cluster). A client first seen
  later warms up its own LoRA (or reuses the one it kept) and joins the
  cluster whose expert's B is closest in cosine distance, the same criterion.
- The server evaluates the largest cluster's model (its expert first, its
  router). Client budgets β do not apply (FedLEASE has no K to cut).
- The assignment of clients to clusters travels with the state, so a resumed
  run keeps it; client-kept warm-up LoRAs live in Flower's node state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..more import LoraPool
from ..more.layer import base_layer_features
from ..run.config import RunConfig
from ..run.seeds import derive_seed
from .aggregation import Combine, weighted_mean
from .base import ClientUpdate, LocalResult, LocalTrainConfig, Method, ServerUpdate, parse_options
from .mole import freeze, replace_module
from .registry import register_method

ASSIGNMENT_KEY = "fedlease.assignment"
NUM_EXPERTS_KEY = "fedlease.num_experts"
CLUSTER_KEY = "fedlease.cluster"
SILHOUETTE_KEY = "fedlease.silhouette"
WARMUP_PREFIX = "warmup."
LINKAGES = ("average", "complete", "single")


@dataclass
class FedLeaseOptions:
    """``--method_options`` of ``fedlease``."""

    max_clusters: int = 4  # largest number of experts silhouette may choose
    warmup_rounds: int = 1  # rounds of per-client LoRA training before the clustering
    linkage: str = "average"  # agglomerative linkage on cosine distances

    def __post_init__(self) -> None:
        if self.max_clusters < 2:
            raise ValueError(f"fedlease: max_clusters={self.max_clusters!r} must be >= 2")
        if self.warmup_rounds < 1:
            raise ValueError(f"fedlease: warmup_rounds={self.warmup_rounds!r} must be >= 1")
        if self.linkage not in LINKAGES:
            raise ValueError(f"fedlease: linkage={self.linkage!r} is not one of {list(LINKAGES)}")


def cluster_clients(vectors: torch.Tensor, max_clusters: int, linkage: str = "average") -> tuple[np.ndarray, float]:
    """Agglomerative clustering of the rows of ``vectors`` on cosine distance; silhouette picks k ∈ [2, max].

    Returns (labels numbered by first appearance, best silhouette). Fewer than
    3 rows: one cluster (silhouette needs 2 ≤ k ≤ n − 1) and a NaN score.
    """
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    n = vectors.shape[0]
    if n < 3:
        return np.zeros(n, dtype=np.int64), math.nan
    unit = F.normalize(vectors.double(), dim=1)
    distance = (1.0 - unit @ unit.T).clamp_min(0.0).numpy()
    np.fill_diagonal(distance, 0.0)
    best_labels, best_score = None, -math.inf
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage).fit_predict(distance)
        score = float(silhouette_score(distance, labels, metric="precomputed"))
        if score > best_score + 1e-12:  # ties keep the smaller k
            best_labels, best_score = labels, score
    _, first = np.unique(best_labels, return_index=True)
    order = np.argsort(np.argsort(first))  # cluster ids by first appearance: stable across sklearn versions
    return order[best_labels].astype(np.int64), best_score


class FedLeaseLinear(nn.Module):
    """A frozen matrix plus LoRA expert slots mixed by FedLEASE's adaptive top-M router.

    ``order`` lists the expert slots in use, the client's own first; the router
    rows ``[0, M)`` stand for ``order[0]``, rows ``[M, 2M − 1)`` for ``order[1:]``.
    """

    def __init__(self, base_layer: nn.Module, slots: int, rank: int, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = base_layer_features(base_layer)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(rank, d_in)) for _ in range(slots)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, rank)) for _ in range(slots)])
        self.router = nn.Parameter(torch.zeros(2 * slots - 1, d_in))  # the active cluster's router
        # every cluster's router (the personal last slot has none), as the server keeps them
        self.register_buffer("router_bank", torch.zeros(slots - 1, 2 * slots - 1, d_in), persistent=False)
        self.scaling = scaling
        self.order: list[int] = []

    def reset_slot(self, slot: int, generator: torch.Generator) -> None:
        """PEFT's default LoRA init: A Kaiming-uniform (a = √5), B zero."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A[slot], a=math.sqrt(5), generator=generator)
            self.lora_B[slot].zero_()

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., M) weights of ``order``: the own expert gets the mass of all its M router outputs."""
        m = len(self.order)
        if m == 1:
            return x.new_ones(*x.shape[:-1], 1)
        logits = F.linear(x, self.router[: 2 * m - 1])  # (..., 2M−1)
        kept, index = logits.topk(m, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, index, torch.softmax(kept, dim=-1))
        return torch.cat([weights[..., :m].sum(-1, keepdim=True), weights[..., m:]], dim=-1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.order:
            return result
        a = torch.stack([self.lora_A[j] for j in self.order])  # (M, r, d_in)
        b = torch.stack([self.lora_B[j] for j in self.order])  # (M, d_out, r)
        xf = x.to(a.dtype)
        z = torch.einsum("...d,mrd->...mr", xf, a)  # every expert's rank-space activations
        h = z * self.gates(xf).unsqueeze(-1)
        return result + (torch.einsum("...mr,mor->...o", h, b) * self.scaling).to(result.dtype)


class FedLeaseState(nn.Module):
    """Server-side bookkeeping carried in the state: cluster of every client, number of experts."""

    def __init__(self, num_clients: int) -> None:
        super().__init__()
        self.register_buffer("assignment", torch.full((num_clients,), -1, dtype=torch.long))
        self.register_buffer("num_experts", torch.zeros((), dtype=torch.long))


def _cluster_of_key(key: str) -> int | None:
    """j of "router.j.<module>" and "<module>.lora_A.j" / "<module>.lora_B.j"; None for other keys."""
    if key.startswith("router."):
        return int(key.split(".", 2)[1])
    head, _, tail = key.rpartition(".")
    return int(tail) if head.endswith((".lora_A", ".lora_B")) and tail.isdigit() else None


@register_method
class FedLease(Method):
    name = "fedlease"
    summary = "FedLEASE: warm-up LoRA per client, B-cosine clustering (silhouette), per-cluster experts, 2M-1 router."

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.options = parse_options(FedLeaseOptions, config.method_options, method=self.name)
        self.slots = self.options.max_clusters + 1  # the last slot holds a client's own warm-up LoRA
        self._private: Mapping[str, torch.Tensor] | None = None
        self._mode = "expert"

    # --- model -----------------------------------------------------------------
    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> nn.Module:
        freeze(model)
        targets = [t.strip() for t in self.config.lora_target_modules.split(",") if t.strip()]
        names = [
            name
            for name, module in model.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets) and hasattr(module, "weight")
        ]
        if not names:
            raise ValueError(f"fedlease: --lora_target_modules={self.config.lora_target_modules!r} matches no layer")
        scaling = self.config.lora_alpha / self.config.lora_rank
        for name in names:
            layer = FedLeaseLinear(model.get_submodule(name), self.slots, self.config.lora_rank, scaling)
            for slot in range(self.slots):
                layer.reset_slot(slot, generator)
            replace_module(model, name, layer)
        model.add_module("fedlease", FedLeaseState(self.config.num_clients))
        return model

    @staticmethod
    def layers(model: nn.Module) -> dict[str, FedLeaseLinear]:
        return {name: m for name, m in model.named_modules() if isinstance(m, FedLeaseLinear)}

    def _configure(self, model: nn.Module, own: int, num_experts: int) -> None:
        """Route over experts ``0..M−1`` with ``own`` first, using cluster ``own``'s router."""
        order = [own] + [j for j in range(num_experts) if j != own]
        for layer in self.layers(model).values():
            layer.order = order

    # --- state -----------------------------------------------------------------
    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.layers(model).items():
            for j in range(self.options.max_clusters):
                state[f"{name}.lora_A.{j}"] = layer.lora_A[j].detach().clone()
                state[f"{name}.lora_B.{j}"] = layer.lora_B[j].detach().clone()
                state[f"router.{j}.{name}"] = layer.router_bank[j].clone()
        state[ASSIGNMENT_KEY] = model.fedlease.assignment.clone()
        state[NUM_EXPERTS_KEY] = model.fedlease.num_experts.clone()
        return state

    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.get_state(model))
        if set(state) != expected:
            raise ValueError(f"fedlease: state keys differ from the model's: {sorted(set(state) ^ expected)[:5]}")
        with torch.no_grad():
            for name, layer in self.layers(model).items():
                for j in range(self.options.max_clusters):
                    layer.lora_A[j].copy_(state[f"{name}.lora_A.{j}"])
                    layer.lora_B[j].copy_(state[f"{name}.lora_B.{j}"])
                    layer.router_bank[j].copy_(state[f"router.{j}.{name}"])
            model.fedlease.assignment.copy_(state[ASSIGNMENT_KEY])
            model.fedlease.num_experts.copy_(state[NUM_EXPERTS_KEY])
        # The server's view (what it evaluates): the largest cluster's model.
        m = int(model.fedlease.num_experts)
        if m == 0:
            for layer in self.layers(model).values():
                layer.order = []
            return
        counts = torch.bincount(model.fedlease.assignment.clamp_min(0), minlength=m)[:m]
        self._use_cluster(model, int(counts.argmax()), m)

    def _use_cluster(self, model: nn.Module, cluster: int, num_experts: int) -> None:
        self._configure(model, cluster, num_experts)
        with torch.no_grad():
            for layer in self.layers(model).values():
                layer.router.copy_(layer.router_bank[cluster])

    def get_private_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self._mode not in ("warmup", "join"):
            return {}
        own = self.slots - 1
        return {
            f"{WARMUP_PREFIX}{name}.lora_{part}": getattr(layer, f"lora_{part}")[own].detach().clone()
            for name, layer in self.layers(model).items()
            for part in "AB"
        }

    def set_private_state(self, model: nn.Module, private: Mapping[str, torch.Tensor] | None) -> None:
        self._private = private  # applied by prepare_round, which knows the client

    def _load_personal(self, model: nn.Module) -> bool:
        """Put this client's warm-up LoRA in the personal slot: the kept one, else a fresh common init."""
        own = self.slots - 1
        kept = self._private is not None and all(
            f"{WARMUP_PREFIX}{name}.lora_A" in self._private for name in self.layers(model)
        )
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "fedlease-warmup"))
        with torch.no_grad():
            for name, layer in self.layers(model).items():
                if kept:
                    layer.lora_A[own].copy_(self._private[f"{WARMUP_PREFIX}{name}.lora_A"])
                    layer.lora_B[own].copy_(self._private[f"{WARMUP_PREFIX}{name}.lora_B"])
                else:  # one init for every client: their B's are then comparable
                    layer.reset_slot(own, generator)
        return kept

    # --- client ----------------------------------------------------------------
    def prepare_round(
        self,
        model: nn.Module,
        payload: Mapping[str, object],
        extras: Mapping[str, torch.Tensor],
        config: LocalTrainConfig,
    ) -> None:
        m = int(model.fedlease.num_experts)
        cluster = int(model.fedlease.assignment[config.partition]) if m else -1
        if m == 0:
            self._mode = "warmup"
            self._load_personal(model)
            self._configure(model, self.slots - 1, 0)
        elif cluster < 0:
            self._mode = "join"  # resolved in local_train: joining may need a warm-up first
        else:
            self._mode = "expert"
            self._use_cluster(model, cluster, m)

    def _train(self, model: nn.Module, params: list[nn.Parameter], batches, config: LocalTrainConfig) -> float:
        for p in params:
            p.requires_grad_(True)
        try:
            optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
            model.train()
            losses = []
            for batch in batches:
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        finally:
            model.eval()
            for p in params:
                p.requires_grad_(False)
        return sum(losses) / max(len(losses), 1)

    def _nearest_cluster(self, model: nn.Module, num_experts: int) -> int:
        """The expert whose flattened B is closest in cosine distance to this client's warm-up B."""
        layers = self.layers(model).values()
        own = torch.cat([layer.lora_B[self.slots - 1].detach().flatten() for layer in layers])
        experts = torch.stack(
            [torch.cat([layer.lora_B[j].detach().flatten() for layer in layers]) for j in range(num_experts)]
        )
        return int(F.cosine_similarity(experts, own.unsqueeze(0), dim=1).argmax())

    def local_train(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        local = list(batches)
        layers = self.layers(model)
        personal = self.slots - 1
        if self._mode == "warmup":
            loss = self._train(model, self._slot_params(layers, personal), local, config)
            extras = {CLUSTER_KEY: torch.tensor(-1.0)}
            if config.server_round >= self.options.warmup_rounds:  # the clustering round: send the LoRA
                extras.update(self.get_private_state(model))
            return LocalResult(
                state=self.get_state(model), num_examples=config.num_examples, train_loss=loss, extras=extras
            )
        m = int(model.fedlease.num_experts)
        if self._mode == "join":
            if not self._load_personal(model):  # never warmed up: do it now, on this round's batches
                self._configure(model, personal, 0)
                self._train(model, self._slot_params(layers, personal), local, config)
            cluster = self._nearest_cluster(model, m)
            self._use_cluster(model, cluster, m)
        else:
            cluster = int(model.fedlease.assignment[config.partition])
        params = self._slot_params(layers, cluster) + [layer.router for layer in layers.values()]
        loss = self._train(model, params, local, config)
        with torch.no_grad():
            for layer in layers.values():
                layer.router_bank[cluster].copy_(layer.router)
        # The runtime wants every reply to hold the whole state: the other clusters' tensors go back
        # unchanged (and the aggregation ignores them), so the measured uplink overstates FedLEASE's.
        return LocalResult(
            state=self.get_state(model),
            num_examples=config.num_examples,
            train_loss=loss,
            extras={CLUSTER_KEY: torch.tensor(float(cluster))},
        )

    @staticmethod
    def _slot_params(layers: Mapping[str, FedLeaseLinear], slot: int) -> list[nn.Parameter]:
        return [p for layer in layers.values() for p in (layer.lora_A[slot], layer.lora_B[slot])]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # --- server ----------------------------------------------------------------
    def aggregate(self, updates: Sequence[ClientUpdate], combine: Combine = weighted_mean) -> dict[str, torch.Tensor]:
        """Per-cluster FedAvg: expert j and router j are averaged (``combine``) over the clients of cluster j.

        Every reply holds the whole state as the server sent it, so a cluster
        without a client this round keeps its tensors (any reply's copy). On the
        clustering round (clients sent warm-up LoRAs) the experts are made from
        the clusters instead.
        """
        first = updates[0].arrays
        merged = {k: v.clone() for k, v in first.items() if not k.startswith(WARMUP_PREFIX) and k != CLUSTER_KEY}
        warm = [u for u in updates if any(k.startswith(WARMUP_PREFIX) for k in u.arrays)]
        if warm:
            return {**merged, **self._allocate(warm, merged)}
        clusters = [int(u.arrays[CLUSTER_KEY]) for u in updates]
        assignment = merged[ASSIGNMENT_KEY]
        for u, cluster in zip(updates, clusters, strict=True):
            if cluster >= 0:
                assignment[u.partition] = cluster  # a client that joined late is now a member
        for j in sorted({c for c in clusters if c >= 0}):
            members = [u for u, c in zip(updates, clusters, strict=True) if c == j]
            keys = [k for k in merged if _cluster_of_key(k) == j]
            weights = [float(u.num_examples) for u in members]
            merged.update(combine([{k: u.arrays[k] for k in keys} for u in members], weights))
        return merged

    def _allocate(self, warm: Sequence[ClientUpdate], merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cluster the warm-up LoRAs on their B's; expert j = the mean LoRA of cluster j; routers zero."""
        names = sorted(
            {
                k.removeprefix(WARMUP_PREFIX).rsplit(".lora_", 1)[0]
                for k in warm[0].arrays
                if k.startswith(WARMUP_PREFIX)
            }
        )
        b = torch.stack(
            [torch.cat([u.arrays[f"{WARMUP_PREFIX}{n}.lora_B"].flatten() for n in names]) for u in warm]
        )  # (C, D)
        labels, score = cluster_clients(b, self.options.max_clusters, self.options.linkage)
        out: dict[str, torch.Tensor] = {}
        weights = torch.tensor([float(u.num_examples) for u in warm], dtype=torch.float64)
        for j in range(int(labels.max()) + 1):
            member = torch.from_numpy(labels == j)
            w = weights * member / (weights * member).sum()  # (C,): this cluster's examples shares
            for n in names:
                for part in "AB":
                    stacked = torch.stack([u.arrays[f"{WARMUP_PREFIX}{n}.lora_{part}"].double() for u in warm])
                    out[f"{n}.lora_{part}.{j}"] = torch.einsum("c,c...->...", w, stacked).float()
        for key, value in merged.items():
            if key.startswith("router."):
                out[key] = torch.zeros_like(value)
        assignment = torch.full_like(merged[ASSIGNMENT_KEY], -1)
        for u, label in zip(warm, labels.tolist(), strict=True):
            assignment[u.partition] = label
        out[ASSIGNMENT_KEY] = assignment
        out[NUM_EXPERTS_KEY] = torch.tensor(int(labels.max()) + 1)
        out[SILHOUETTE_KEY] = torch.tensor(score, dtype=torch.float64)
        return out

    def server_update(self, server_round: int, model: nn.Module, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        assignment = model.fedlease.assignment
        m = int(model.fedlease.num_experts)
        log: dict[str, object] = {
            "fedlease_experts": m,
            "fedlease_cluster_sizes": torch.bincount(assignment[assignment >= 0], minlength=m).tolist() if m else [],
        }
        if SILHOUETTE_KEY in extras:
            score = float(extras[SILHOUETTE_KEY])
            log["fedlease_silhouette"] = None if math.isnan(score) else score
        return ServerUpdate(log=log)
