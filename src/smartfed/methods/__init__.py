"""Federated methods on one runtime: a registry, one file per method."""

from .base import LocalResult, LocalTrainConfig, Method, ServerUpdate
from .registry import METHODS, get_method_class, list_methods, register_method


def load_builtin_methods() -> None:
    """Import the method files so they register themselves (explicit, not at package import)."""
    from . import smartfed  # noqa: F401


__all__ = [
    "METHODS",
    "LocalResult",
    "LocalTrainConfig",
    "Method",
    "ServerUpdate",
    "get_method_class",
    "list_methods",
    "load_builtin_methods",
    "register_method",
]
