"""MoRE: Mixture of Rank-wise Experts over existing LoRA adapters (SmartFed, seed 001)."""

from .config import MoreConfig
from .layer import MoreLinear
from .model import MoreModel, attach_more
from .pool import AdapterInfo, LoraPool, PoolModule
from .router import GATES, Router, top_k_gates

__all__ = [
    "GATES",
    "AdapterInfo",
    "LoraPool",
    "MoreConfig",
    "MoreLinear",
    "MoreModel",
    "PoolModule",
    "Router",
    "attach_more",
    "top_k_gates",
]
