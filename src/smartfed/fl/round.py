"""One server round as the strategy sees it: what the server loop passes in, and what aggregation gives back.

Before, the loop wrote five attributes on the strategy each round and read two back,
so one round's logic went back and forth between two files. Now the loop builds a
``RoundContext``, binds it to the strategy for the round (``SmartFedStrategy.bound``:
Flower's ``Strategy`` signatures are fixed and its DP wrappers call them, so the
context cannot travel as an argument), and reads the aggregation's results from the
same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..methods import ClientUpdate, Combine, Method


@dataclass
class RoundContext:
    """One round's inputs to sampling and aggregation, and (filled by the strategy) its results."""

    server_round: int
    method: Method
    combine: Combine  # the rule of --aggregation (and --clip_update_norm) for this round
    state: dict[str, torch.Tensor]  # the global state sent down, in server key order (DP clipping is positional)
    extras: dict[str, torch.Tensor]  # sent beside the state (not clipped by DP wrappers)
    uniform_weights: bool = False  # DP-FedAvg averages the clipped states with equal weights
    attempt: int = 0  # re-samplings of this round so far (the sampling seed's last part)
    # filled by the strategy
    held_extras: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # partition -> its extras
    updates: list[ClientUpdate] = field(default_factory=list)  # the aggregated replies, by partition
    merged_extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the aggregate's non-state arrays
