"""SmartFed's Flower strategy: FedAvg with reproducible, partition-aware client sampling.

Flower's simulation gives nodes random ids each run, and ``FedAvg`` samples
with the global ``random``; a resumed run would then train other clients than
the run it continues. So the strategy first asks every node for its
``partition-id`` (a QUERY message) and samples partitions with an RNG seeded by
(seed, round). Aggregation is the method's (``Method.aggregate``, FedAvg by
default); the strategy turns replies into ``ClientUpdate``s sorted by partition.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..methods import ClientUpdate
from . import keys
from .runtime import derive_seed


class SmartFedStrategy(FedAvg):
    """FedAvg whose sampled clients depend only on (seed, round)."""

    def __init__(self, *, num_clients: int, sample_clients: int, seed: int, timeout: float = 3600.0) -> None:
        super().__init__(
            fraction_train=sample_clients / num_clients,
            fraction_evaluate=0.0,
            min_train_nodes=sample_clients,
            min_available_nodes=num_clients,
            weighted_by_key=keys.NUM_EXAMPLES,
            arrayrecord_key=keys.ARRAYS,
            configrecord_key=keys.CONFIG,
        )
        self.num_clients = num_clients
        self.sample_clients = sample_clients
        self.seed = seed
        self.timeout = timeout
        self.node_of_partition: dict[int, int] = {}

    def discover(self, grid: Grid, *, wait_seconds: float = 600.0) -> dict[int, int]:
        """Wait for ``num_clients`` nodes, then learn each node's partition id."""
        deadline = time.monotonic() + wait_seconds
        while len(list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {self.num_clients} clients connected")
            time.sleep(0.5)
        queries = [
            Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=node)
            for node in grid.get_node_ids()
        ]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            if reply.has_error():
                continue
            pid = int(reply.content[keys.METRICS][keys.PARTITION_ID])
            node = reply.metadata.src_node_id
            if not 0 <= pid < self.num_clients:
                raise ValueError(f"node {node} holds partition-id={pid}, outside [0, {self.num_clients}) (num-clients)")
            if pid in self.node_of_partition:
                raise ValueError(f"partition-id={pid} is claimed by nodes {self.node_of_partition[pid]} and {node}")
            self.node_of_partition[pid] = node
        missing = sorted(set(range(self.num_clients)) - set(self.node_of_partition))
        if missing:
            raise RuntimeError(f"no client answered for partition(s) {missing[:10]}")
        return self.node_of_partition

    def client_updates(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        """The replies without errors, as the method's aggregation sees them (partition, arrays, weight)."""
        partition_of_node = {node: pid for pid, node in self.node_of_partition.items()}
        updates = []
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content[keys.METRICS]
            updates.append(
                ClientUpdate(
                    partition=partition_of_node[reply.metadata.src_node_id],
                    arrays=reply.content[keys.ARRAYS].to_torch_state_dict(),
                    num_examples=int(metrics[keys.NUM_EXAMPLES]),
                    train_loss=float(metrics[keys.TRAIN_LOSS]),
                )
            )
        return sorted(updates, key=lambda u: u.partition)  # arrival order must not change the result

    def sample_partitions(self, server_round: int) -> list[int]:
        rng = random.Random(derive_seed(self.seed, "sample", server_round))
        return sorted(rng.sample(sorted(self.node_of_partition), self.sample_clients))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = [self.node_of_partition[p] for p in self.sample_partitions(server_round)]
        return self._construct_messages(record, nodes, MessageType.TRAIN)
