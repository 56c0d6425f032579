"""Registry of federated methods: one file per method, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from .base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``smartfed run --method cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def list_methods() -> dict[str, str]:
    """Name -> one-line summary of every registered method."""
    return {name: cls.summary for name, cls in sorted(METHODS.items())}


def get_method_class(name: str) -> Callable[..., Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}")
    return METHODS[name]
