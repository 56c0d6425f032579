"""A SuperNode's node config: partition id checks and a node's own data file."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from smartfed.fl.client_app import local_data, partition_id

FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_tiny.jsonl"


def _context(**node_config):
    return SimpleNamespace(node_config=node_config)


def test_partition_id_read_and_checked():
    assert partition_id(_context(**{"partition-id": 3, "num-partitions": 4})) == 3
    with pytest.raises(ValueError, match="partition-id=4 is outside"):
        partition_id(_context(**{"partition-id": 4, "num-partitions": 4}))
    with pytest.raises(ValueError, match="--node-config"):
        partition_id(_context())


def test_node_data_path_replaces_the_partition():
    runtime = SimpleNamespace(partitions=["partition-0"])
    assert local_data(_context(), runtime, 0) == "partition-0"
    data = local_data(_context(**{"data-path": str(FIXTURE)}), runtime, 0)
    assert len(data) == len(FIXTURE.read_text().strip().splitlines())
    assert set(data.column_names) >= {"prompt", "answer", "label"}
