"""SmartFed: federated adaptation of LLMs by routing rank-one experts of existing LoRA adapters."""

from .more import LoraPool, MoreConfig, MoreModel, attach_more

__all__ = ["LoraPool", "MoreConfig", "MoreModel", "attach_more"]
__version__ = "0.1.0"
