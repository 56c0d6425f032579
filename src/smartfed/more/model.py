"""Attach MoRE to a transformers model, PEFT-style.

``attach_more`` swaps every target matrix named by the pool for a ``MoreLinear``
and returns a ``MoreModel`` that forwards ``forward``/``generate`` and any other
attribute to the wrapped model (as ``PeftModel`` does), and adds what SmartFed
needs: router-only parameters, router (de)serialisation, per-matrix quotas for
EEQA and per-expert statistics (stats.py).

K, the experts kept per token, is ``top_k`` throughout: ``MoreConfig.top_k`` for
every matrix at the start, ``MoreLinear.top_k`` per matrix after. A matrix's
``top_k`` is also called its *quota* (``quotas``, ``set_quotas``): the word EEQA
(Elastic Expert Quota Allocation) uses for the per-matrix top_k it moves around.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import sibling_temp_file
from .config import MoreConfig
from .layer import MoreLinear, base_layer_features
from .pool import LoraPool
from .stats import token_mask, tracking

ROUTER_CONFIG_KEY = "smartfed.more_config"
ROUTER_EXPERTS_KEY = "smartfed.num_experts"
ROUTER_QUOTAS_KEY = "smartfed.quotas"


def _check_top_k(module: str, top_k: object, num_experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k={top_k!r} for module {module!r}: must be an int in [1, {num_experts}] (its number of experts)"
        )
    return top_k


class MoreModel(nn.Module):
    """A transformers model whose pool-targeted matrices are MoRE layers."""

    def __init__(
        self,
        model: nn.Module,
        pool: LoraPool,
        config: MoreConfig | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.more_config = config or MoreConfig()
        self.pool = pool
        for param in model.parameters():
            param.requires_grad_(False)
        self._layer_names: list[str] = []
        self._tracking = False
        for name, experts in pool.modules.items():
            if self.more_config.selects(name):
                self._wrap(name, experts, generator)
        if not self._layer_names:
            raise ValueError(
                f"MoreConfig.target_modules={self.more_config.target_modules!r} selects none of the pool's matrices {pool.module_names}"
            )

    def _wrap(self, name: str, experts, generator: torch.Generator | None) -> None:
        owners = [a.name for a in self.pool.adapters if name in a.target_modules]
        try:
            base_layer = self.base_model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"LoRA adapter(s) {owners} target module {name!r}, which this model does not have"
            ) from None
        try:
            d_in, d_out = base_layer_features(base_layer)
        except TypeError as err:
            raise ValueError(f"LoRA adapter(s) {owners} target module {name!r}: {err}") from None
        if (d_in, d_out) != (experts.in_features, experts.out_features):
            raise ValueError(
                f"LoRA adapter(s) {owners} do not fit module {name!r}: experts are (d_in, d_out) = "
                f"{(experts.in_features, experts.out_features)}, the model's layer is {(d_in, d_out)} "
                "(adapter trained for another base model?)"
            )
        top_k = experts.num_experts if self.more_config.top_k is None else self.more_config.top_k
        _check_top_k(name, top_k, experts.num_experts)
        layer = MoreLinear(base_layer, experts, self.more_config, top_k=top_k, generator=generator)
        parent_name, _, child = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        setattr(parent, child, layer)
        self._layer_names.append(name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not yet set: avoid infinite recursion
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if not (self._tracking and mask is not None):
            return self.base_model(*args, **kwargs)
        with token_mask(self.more_layers().values(), mask):  # so statistics skip padding tokens
            return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # --- layers and parameters -------------------------------------------------
    def more_layers(self) -> dict[str, MoreLinear]:
        """Target module name -> its MoRE layer, in pool order."""
        return {name: self.base_model.get_submodule(name) for name in self._layer_names}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The routers' parameters: the only ones with requires_grad."""
        return [p for layer in self.more_layers().values() for p in layer.router.parameters()]

    def num_parameters_summary(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; the frozen experts are counted as buffers, not parameters."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.base_model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_parameters_summary()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # --- routers ---------------------------------------------------------------
    def router_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.router.weight": tensor, ...}``: what a SmartFed client sends."""
        return {
            f"{name}.router.{key}": value.detach().clone()
            for name, layer in self.more_layers().items()
            for key, value in layer.router.state_dict().items()
        }

    def load_router_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "router state") -> None:
        """Copy router tensors in; every key must be known, present and of the right shape."""
        expected = {
            f"{name}.router.{key}": value
            for name, layer in self.more_layers().items()
            for key, value in layer.router.state_dict().items()
        }
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for key, target in expected.items():
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{source}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"{source}: {key!r} holds non-finite values")
        with torch.no_grad():
            for name, layer in self.more_layers().items():
                for key, param in layer.router.named_parameters():
                    param.copy_(state[f"{name}.router.{key}"])

    def save_router(self, path: str | os.PathLike) -> Path:
        """Write the routers to a safetensors file atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": "pt",
            ROUTER_CONFIG_KEY: self.more_config.to_json(),
            ROUTER_EXPERTS_KEY: json.dumps({n: layer.num_experts for n, layer in self.more_layers().items()}),
            ROUTER_QUOTAS_KEY: json.dumps(self.quotas()),
        }
        state = {k: v.contiguous().cpu() for k, v in self.router_state_dict().items()}
        tmp = sibling_temp_file(path)
        try:
            save_file(state, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def load_router(self, path: str | os.PathLike) -> None:
        """Load routers saved by ``save_router``; refuses a file for other experts."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"router file {path} does not exist")
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"router file {path}: not a readable safetensors file ({err})") from err
        self.load_router_state_dict(state, source=f"router file {path}")

    # --- quotas (EEQA) ---------------------------------------------------------
    def quotas(self) -> dict[str, int]:
        """Current ``top_k`` (quota K_t) of every MoRE matrix."""
        return {name: layer.top_k for name, layer in self.more_layers().items()}

    def set_quotas(self, quotas: dict[str, int]) -> None:
        """Change ``top_k`` per matrix at run time (EEQA); validates all before changing any."""
        layers = self.more_layers()
        unknown = sorted(set(quotas) - set(layers))
        if unknown:
            raise ValueError(f"set_quotas: unknown module(s) {unknown[:5]}; MoRE modules are e.g. {list(layers)[:3]}")
        for name, top_k in quotas.items():
            _check_top_k(name, top_k, layers[name].num_experts)
        for name, top_k in quotas.items():
            layers[name].top_k = top_k

    # --- expert statistics -----------------------------------------------------
    @contextmanager
    def tracking_expert_stats(self, reset: bool = True) -> Iterator[None]:
        """Accumulate the per-expert statistics (``stats.ExpertStats.accumulate``) in every forward inside the block."""
        with tracking(self.more_layers().values(), reset=reset):
            self._tracking = True
            try:
                yield
            finally:
                self._tracking = False

    def expert_stats(self) -> dict[str, dict[str, torch.Tensor | int]]:
        """Per MoRE matrix: the means of ``stats.STAT_SUMS`` (each (M,)) and the tokens seen."""
        return {name: layer.stats() for name, layer in self.more_layers().items()}

    def reset_expert_stats(self) -> None:
        for layer in self.more_layers().values():
            layer.reset_stats()


def attach_more(
    model: nn.Module,
    pool: LoraPool,
    config: MoreConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> MoreModel:
    """Wrap every matrix of ``model`` that ``pool`` targets in a MoRE layer.

    The model is modified in place (as ``peft.get_peft_model`` does) and frozen;
    only the routers train. ``generator`` seeds a ``normal`` router init.
    """
    return MoreModel(model, pool, config, generator=generator)
