"""Federated methods on one runtime: a registry, one file per method."""

from .aggregation import Combine, weighted_mean
from .base import ClientUpdate, LocalResult, LocalTrainConfig, Method, ServerUpdate, parse_options
from .registry import METHODS, get_method_class, list_methods, register_method


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


__all__ = [
    "METHODS",
    "ClientUpdate",
    "Combine",
    "LocalResult",
    "LocalTrainConfig",
    "Method",
    "ServerUpdate",
    "get_method_class",
    "list_methods",
    "load_builtin_methods",
    "parse_options",
    "register_method",
    "weighted_mean",
]
