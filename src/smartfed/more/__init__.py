"""MoRE: Mixture of Rank-wise Experts over existing LoRA adapters (SmartFed, Wu et al., 2025)."""

from .config import MoreConfig, RoutingSpec
from .layer import MoreLinear
from .model import MoreModel, attach_more
from .pool import AdapterInfo, LoraPool, PoolModule
from .router import GATES, Gate, Router, top_k_gates
from .stats import STAT_SUMS, ExpertStats

__all__ = [
    "GATES",
    "STAT_SUMS",
    "AdapterInfo",
    "ExpertStats",
    "Gate",
    "LoraPool",
    "MoreConfig",
    "MoreLinear",
    "MoreModel",
    "PoolModule",
    "Router",
    "RoutingSpec",
    "attach_more",
    "top_k_gates",
]
