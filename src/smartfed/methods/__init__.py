"""Federated methods on one runtime: a registry, one file per method."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .aggregation import Combine, weighted_mean
from .base import ClientUpdate, LocalResult, LocalTrainConfig, Method, ServerUpdate, parse_options
from .registry import METHODS, get_method_class, list_methods, register_method

if TYPE_CHECKING:
    from ..run.config import RunConfig


def load_builtin_methods() -> None:
    """Import the method files so they register themselves (explicit, not at package import)."""
    from . import (
        a3smoe,  # noqa: F401
        ablations,  # noqa: F401
        fedit,  # noqa: F401
        fedlease,  # noqa: F401
        fedsa,  # noqa: F401
        flexlora,  # noqa: F401
        flora,  # noqa: F401
        hetlora,  # noqa: F401
        lorahub,  # noqa: F401
        merge,  # noqa: F401
        mole,  # noqa: F401
        smartfed,  # noqa: F401
    )


def check_sources(config: RunConfig) -> None:
    """The fields without a usable default: the model, and the pool when ``config.method`` reads one.

    An unknown ``--method`` fails here, before Flower starts.
    """
    if not config.model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    load_builtin_methods()
    method = get_method_class(config.method)
    if not config.lora_pool and getattr(method, "uses_pool", True):
        raise ValueError(f"--lora_pool is required by method {config.method!r}")


__all__ = [
    "METHODS",
    "ClientUpdate",
    "Combine",
    "LocalResult",
    "LocalTrainConfig",
    "Method",
    "ServerUpdate",
    "check_sources",
    "get_method_class",
    "list_methods",
    "load_builtin_methods",
    "parse_options",
    "register_method",
    "weighted_mean",
]
