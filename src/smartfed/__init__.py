"""SmartFed: federated adaptation of LLMs by routing rank-one experts of existing LoRA adapters."""

from .more import LoraPool, MoreConfig, MoreModel, attach_more
from .serving.inference import Loaded, load, load_router_file

__all__ = ["Loaded", "LoraPool", "MoreConfig", "MoreModel", "attach_more", "load", "load_router_file"]
__version__ = "0.1.0"
