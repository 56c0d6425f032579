"""Static merge of the pool's adapters with PEFT's ``add_weighted_adapter``: a zero-training baseline.

Task arithmetic (Ilharco et al., 2023) and TIES-merging (Yadav et al., 2023)
as PEFT implements them: the pool's adapters are loaded into one
``PeftModel`` and combined once, at build, into the adapter that every
client and the server use. Nothing trains: a client only reports the merged
model's loss on its local batches (``train_loss``), and the server's
evaluation scores the merge. Run it for one round (``--num_rounds 1``) to get
its score in a comparison; more rounds repeat the same numbers.

``combination_type`` (``--method_options``): ``linear`` (PEFT mixes A and B
separately; equal ranks), ``cat`` (the exact weighted sum of the updates),
``svd`` (the weighted sum truncated by SVD to ``svd_rank``), ``ties`` /
``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` (pruned to ``density``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from ..more import LoraPool
from ..run.config import RunConfig
from .base import LocalResult, LocalTrainConfig, Method, parse_options
from .registry import register_method

MERGED = "merged"
WEIGHTS_KEY = "merge.weights"
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass
class MergeOptions:
    """``--method_options`` of ``merge``."""

    combination_type: str = "cat"
    weights: str = ""  # one weight per pool adapter, ':'-separated (e.g. "1:0.5"); empty: all 1
    density: float = 0.5  # fraction of entries kept by ties/dare/magnitude_prune
    svd_rank: int = 0  # rank of an svd merge (0: the largest adapter rank, PEFT's default)

    def __post_init__(self) -> None:
        if self.combination_type not in COMBINATIONS:
            raise ValueError(f"merge: combination_type={self.combination_type!r} is not one of {list(COMBINATIONS)}")
        if not 0 < self.density <= 1:
            raise ValueError(f"merge: density={self.density!r} must be in (0, 1]")
        if self.svd_rank < 0:
            raise ValueError(f"merge: svd_rank={self.svd_rank!r} must be >= 0")
        try:
            [float(w) for w in self.weights.split(":") if w.strip()]
        except ValueError:
            raise ValueError(f"merge: weights={self.weights!r} must be ':'-separated numbers") from None

    def weight_list(self, num_adapters: int) -> list[float]:
        values = [float(w) for w in self.weights.split(":") if w.strip()] or [1.0] * num_adapters
        if len(values) != num_adapters:
            raise ValueError(f"merge: weights={self.weights!r} gives {len(values)} weights for {num_adapters} adapters")
        return values


def merge_pool(model: nn.Module, pool: LoraPool, options: MergeOptions, *, seed: int = 0) -> PeftModel:
    """Load every pool adapter into ``model`` with PEFT and make their weighted combination the active adapter."""
    names = [a.name for a in pool.adapters]
    peft_model = PeftModel.from_pretrained(model, str(pool.adapters[0].path), adapter_name=names[0])
    for info in pool.adapters[1:]:
        peft_model.load_adapter(str(info.path), adapter_name=info.name)
    kwargs: dict[str, object] = {"combination_type": options.combination_type}
    if options.combination_type in _NEEDS_DENSITY:
        kwargs["density"] = options.density
    if options.svd_rank:
        kwargs["svd_rank"] = options.svd_rank
    with torch.random.fork_rng(devices=[]):  # DARE prunes at random: make it reproducible
        torch.manual_seed(seed)
        peft_model.add_weighted_adapter(names, options.weight_list(len(names)), MERGED, **kwargs)
    peft_model.set_adapter(MERGED)
    for name in names:  # only the merge is used: free the originals
        peft_model.delete_adapter(name)
    peft_model.eval()
    return peft_model


@register_method
class Merge(Method):
    name = "merge"
    summary = "Static PEFT merge of the pool (cat/linear/svd/ties/dare); no training, a zero-round baseline."

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.options = parse_options(MergeOptions, config.method_options, method=self.name)

    def build(self, model: nn.Module, pool: LoraPool | None, generator: torch.Generator) -> PeftModel:
        if pool is None:
            raise ValueError("method 'merge' needs --lora_pool")
        self._weights = torch.tensor(self.options.weight_list(len(pool)), dtype=torch.float32)
        return merge_pool(model, pool, self.options, seed=generator.initial_seed())

    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # The merge weights: constant, but the run folder then records what was merged.
        return {WEIGHTS_KEY: self._weights.clone()}

    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        weights = state.get(WEIGHTS_KEY)
        if weights is None or not torch.allclose(weights.float(), self._weights):
            raise ValueError(f"merge: the state holds weights {weights}, this merge was built with {self._weights}")

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def local_train(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], config: LocalTrainConfig
    ) -> LocalResult:
        """No training: the merged model's mean loss on the local batches."""
        model.eval()
        losses: list[float] = []
        with torch.no_grad():
            for batch in batches:
                losses.append(model(**batch).loss.item())
        return LocalResult(
            state=self.get_state(model), num_examples=config.num_examples, train_loss=sum(losses) / max(len(losses), 1)
        )
