"""LoRAHub baseline, federated: a gradient-free search of the weights that compose the pool's adapters.

Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition" (2023): the adapters ``(A_n, B_n)`` of a pool are composed as
``A = Σ_n w_n A_n``, ``B = Σ_n w_n B_n`` and the weights ``w ∈ [−1.5, 1.5]^N``
are found by nevergrad (NGOpt in the paper, CMA here by default) minimising ``loss(w) + 0.05 · ‖w‖₁`` on a few
examples, without gradients.

Federated version: the server holds the nevergrad optimiser. Each round it
sends a population of candidate weight vectors with the state; each sampled
client scores every candidate by its mean loss on its local batches (forward
passes only) and sends the losses up; the server averages them by examples,
adds the L1 term, tells the optimiser, keeps the best candidate seen so far as
the state (what the server evaluates) and asks the next population.

Resume replays the optimiser instead of pickling it: the run payload holds
every told population and its losses; a fresh optimiser with the same seed
asks and is told the same points in the same order, and must ask the same
candidates again (checked).

All adapters must share rank, alpha and target matrices (LoRAHub's own
assumption: it sums A and B entry by entry).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ..more import LoraPool
from ..run.config import RunConfig
from .base import LocalResult, LocalTrainConfig, Method, ServerUpdate, parse_options
from .registry import register_method

WEIGHTS_KEY = "lorahub.weights"
CANDIDATES_KEY = "lorahub.candidates"
LOSSES_KEY = "lorahub.losses"
ADAPTER = "lorahub"
HISTORY = "lorahub_history"


@dataclass
class LorahubOptions:
    """``--method_options`` of ``lorahub`` (defaults: the LoRAHub paper)."""

    population: int = 4  # candidates scored per round
    l1: float = 0.05  # weight of ‖w‖₁ in the objective
    bound: float = 1.5  # w ∈ [−bound, bound]
    # any nevergrad registry name; CMA by default: NGOpt of nevergrad 1.0.12 picks, at small budgets, a
    # metamodel that fails under numpy 2 and leaves its worker threads hanging
    optimizer: str = "CMA"
    budget: int = 40  # the optimiser's planned evaluations (NGOpt picks its algorithm from it; not a stop)
    seed: int = 0  # seed of the optimiser (combined with --seed)

    def __post_init__(self) -> None:
        if self.population < 1:
            raise ValueError(f"lorahub: population={self.population!r} must be >= 1")
        if self.l1 < 0:
            raise ValueError(f"lorahub: l1={self.l1!r} must be >= 0")
        if not self.bound > 0:
            raise ValueError(f"lorahub: bound={self.bound!r} must be > 0")
        if self.budget < 1:
            raise ValueError(f"lorahub: budget={self.budget!r} must be >= 1")
        import nevergrad as ng

        if self.optimizer not in ng.optimizers.registry:
            raise ValueError(f"lorahub: optimizer={self.optimizer!r} is not a nevergrad optimizer (e.g. NGOpt, CMA)")


class LorahubSearch:
    """Ask/tell around a seeded nevergrad optimiser, with a JSON history that replays it exactly."""

    def __init__(self, num_adapters: int, options: LorahubOptions, seed: int) -> None:
        import nevergrad as ng

        self.options = options
        parametrization = ng.p.Array(init=np.zeros(num_adapters), lower=-options.bound, upper=options.bound)
        parametrization.random_state = np.random.RandomState(seed % 2**32)
        self.optimizer = ng.optimizers.registry[options.optimizer](
            parametrization=parametrization, budget=options.budget, num_workers=options.population
        )
        self.pending: list = []
        self.history: list[dict[str, list]] = []
        self.best_objective = math.inf
        self.best = np.zeros(num_adapters)

    def objective(self, weights: np.ndarray, loss: float) -> float:
        """LoRAHub's objective: the loss plus l1 · ‖w‖₁."""
        return float(loss) + self.options.l1 * float(np.abs(weights).sum())

    def ask(self) -> np.ndarray:
        """The next population ``(P, N)``."""
        if self.pending:
            raise RuntimeError("lorahub: a population is still waiting for its losses")
        self.pending = [self.optimizer.ask() for _ in range(self.options.population)]
        return np.stack([c.value for c in self.pending])

    def tell(self, losses: Iterable[float]) -> None:
        losses = [float(x) for x in losses]
        if len(losses) != len(self.pending):
            raise ValueError(f"lorahub: {len(losses)} losses for {len(self.pending)} candidates")
        for candidate, loss in zip(self.pending, losses, strict=True):
            value = self.objective(candidate.value, loss)
            self.optimizer.tell(candidate, value)
            if value < self.best_objective:
                self.best_objective, self.best = value, np.array(candidate.value)
        self.history.append({"candidates": [c.value.tolist() for c in self.pending], "losses": losses})
        self.pending = []

    def replay(self, history: list[dict[str, list]]) -> None:
        """Re-ask and re-tell a recorded history; the optimiser must ask the recorded candidates."""
        for step, record in enumerate(history):
            asked = self.ask()
            recorded = np.asarray(record["candidates"], dtype=np.float64)
            if asked.shape != recorded.shape or not np.allclose(asked, recorded, rtol=0, atol=1e-9):
                raise ValueError(
                    f"lorahub: replaying population {step + 1}, the optimiser asked other candidates than the "
                    "run recorded (another nevergrad version or options?)"
                )
            self.tell(record["losses"])


class LorahubModel(nn.Module):
    """A PEFT LoRA model whose single adapter is ``Σ_n w_n (A_n, B_n)`` over the pool."""

    def __init__(self, model: nn.Module, pool: LoraPool) -> None:
        super().__init__()
        first = pool.adapters[0]
        for info in pool.adapters[1:]:
            same = (info.rank, info.alpha, info.use_rslora, set(info.target_modules))
            if same != (first.rank, first.alpha, first.use_rslora, set(first.target_modules)):
                raise ValueError(
                    f"lorahub: adapters {first.name!r} and {info.name!r} differ in rank, alpha or target matrices; "
                    "LoRAHub composes A and B entry by entry and needs them equal"
                )
        config = LoraConfig(
            r=first.rank,
            lora_alpha=first.alpha,
            use_rslora=first.use_rslora,
            target_modules=list(first.target_modules),
            lora_dropout=0.0,
        )
        self.peft_model = get_peft_model(model, config, adapter_name=ADAPTER)
        for param in self.peft_model.parameters():
            param.requires_grad_(False)
        n, r = len(pool), first.rank
        # (N, r, d_in) and (N, d_out, r) per matrix: the pool stacks adapters in order, r ranks each
        self.stacks = {
            name: (m.A.reshape(n, r, -1), m.B.reshape(m.B.shape[0], n, r).permute(1, 0, 2).contiguous())
            for name, m in pool.modules.items()
        }
        self.register_buffer("weights", torch.zeros(n), persistent=False)
        self.register_buffer("candidates", torch.zeros(0, n), persistent=False)

    def compose(self, weights: torch.Tensor) -> None:
        """Load ``Σ_n w_n A_n`` and ``Σ_n w_n B_n`` into the PEFT adapter of every matrix."""
        base = self.peft_model.base_model.model
        with torch.no_grad():
            for name, (a, b) in self.stacks.items():
                layer = base.get_submodule(name)
                w = weights.to(a.dtype)
                layer.lora_A[ADAPTER].weight.copy_(torch.einsum("n,nrd->rd", w, a))
                layer.lora_B[ADAPTER].weight.copy_(torch.einsum("n,nor->or", w, b))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "peft_model":
                raise
            return getattr(self.peft_model, name)  # config, device, ... as PeftModel forwards them

    def forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.peft_model.generate(*args, **kwargs)


@register_method
class Lorahub(Method):
    name = "lorahub"
    summary = "LoRAHub: nevergrad search of adapter weights in [-1.5, 1.5] (+L1 0.05); clients only score candidates."

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.options = parse_options(LorahubOptions, config.method_options, method=self.name)

    def _new_search(self, num_adapters: int) -> LorahubSearch:
        return LorahubSearch(num_adapters, self.options, seed=self.config.seed * 1_000_003 + self.options.seed)

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> LorahubModel:
        if pool is None:
            raise ValueError("method 'lorahub' needs --lora_pool")
        wrapped = LorahubModel(model, pool)
        self.search = self._new_search(len(pool))
        wrapped.candidates = torch.from_numpy(self.search.ask()).float()  # round 1's population
        wrapped.compose(wrapped.weights)
        return wrapped

    def get_state(self, model: LorahubModel) -> dict[str, torch.Tensor]:
        return {WEIGHTS_KEY: model.weights.clone(), CANDIDATES_KEY: model.candidates.clone()}

    def set_state(self, model: LorahubModel, state: Mapping[str, torch.Tensor]) -> None:
        weights, candidates = state[WEIGHTS_KEY], state[CANDIDATES_KEY]
        if weights.shape != model.weights.shape or candidates.shape[1:] != model.weights.shape:
            raise ValueError(
                f"lorahub: state weights {tuple(weights.shape)} / candidates {tuple(candidates.shape)} "
                f"do not fit a pool of {model.weights.numel()} adapters"
            )
        model.weights = weights.float().clone()
        model.candidates = candidates.float().clone()
        model.compose(model.weights)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def local_train(
        self, model: LorahubModel, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        """Score every candidate by its mean loss over the same local batches (no gradient)."""
        local = list(batches)
        model.eval()
        losses = torch.zeros(model.candidates.shape[0], dtype=torch.float64)
        with torch.no_grad():
            for i, weights in enumerate(model.candidates):
                model.compose(weights)
                losses[i] = sum(model(**batch).loss.item() for batch in local) / max(len(local), 1)
        model.compose(model.weights)
        return LocalResult(
            state=self.get_state(model),
            num_examples=config.num_examples,
            train_loss=float(losses.min()) if losses.numel() else math.nan,
            extras={LOSSES_KEY: losses},
        )

    def server_update(self, server_round: int, model: LorahubModel, extras: Mapping[str, torch.Tensor]) -> ServerUpdate:
        losses = extras[LOSSES_KEY].tolist()
        self.search.tell(losses)
        model.weights = torch.from_numpy(self.search.best).float()
        model.candidates = torch.from_numpy(self.search.ask()).float()
        model.compose(model.weights)
        return ServerUpdate(
            payload={HISTORY: self.search.history},
            log={
                "lorahub_best_objective": self.search.best_objective,
                "lorahub_round_min_loss": min(losses),
                "lorahub_weights": model.weights.tolist(),
            },
        )

    def restore_payload(self, model: LorahubModel, payload: Mapping[str, object]) -> None:
        self.search = self._new_search(model.weights.numel())
        self.search.replay(list(payload.get(HISTORY, [])))
        pending = torch.from_numpy(self.search.ask()).float()
        if not torch.allclose(pending, model.candidates, rtol=0, atol=1e-6):
            raise ValueError("lorahub: the replayed optimiser asks other candidates than the checkpoint holds")
        model.weights = torch.from_numpy(self.search.best).float()
        model.compose(model.weights)
