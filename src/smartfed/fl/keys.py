"""Record keys of every message between the SmartFed ServerApp and ClientApps, in one place."""

ARRAYS = "arrays"  # ArrayRecord: the method's state (+ its extras, disjoint keys)
CONFIG = "config"  # ConfigRecord: round and server payload
METRICS = "metrics"  # MetricRecord of a reply
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
TRAIN_LOSS = "train-loss"
STATE_BYTES = "state-bytes"
EXTRAS_BYTES = "extras-bytes"
SERVER_ROUND = "server-round"
PAYLOAD = "payload"  # JSON string of the method's server payload (e.g. quotas)
PARTITION_ID = "partition-id"  # node config key (Flower's convention) and query reply
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"  # optional node config key: the node's own Alpaca-style JSONL file
DEVICE = "device"  # optional node config key: this SuperNode's device ("cuda:1"), over the run's --device
PRIVATE = "smartfed-private"  # context.state ArrayRecord: tensors a client keeps between rounds, never sent
