"""SmartFed: federated adaptation of LLMs by routing rank-one experts of existing LoRA adapters."""

from .inference import Loaded, load, load_router_file
from .more import LoraPool, MoreConfig, MoreModel, attach_more

__all__ = ["Loaded", "LoraPool", "MoreConfig", "MoreModel", "attach_more", "load", "load_router_file"]
__version__ = "0.1.0"
