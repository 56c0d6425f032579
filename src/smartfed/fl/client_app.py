"""SmartFed's Flower ClientApp: train the method's state on this node's partition.

Run by Flower's simulation engine (one virtual node per partition) or by a
SuperNode started with ``--node-config "partition-id=N num-partitions=M"``; a
SuperNode's node config may add ``device='cuda:1'``, which it uses over the run's
``--device`` (one GPU per SuperNode on a multi-GPU machine).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import replace

import datasets
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from ..data import batches, read_alpaca_jsonl
from ..methods import LocalResult, LocalTrainConfig
from ..run.config import RunConfig
from ..run.seeds import derive_seed
from . import keys, secagg
from .privacy import KEY_CLIPPING_NORM, clip_state
from .runtime import get_runtime
from .wire import decode as wire_decode
from .wire import encode as wire_encode
from .wire import wire_bytes


def partition_id(context: Context) -> int:
    """This node's partition id, checked against the node's own num-partitions."""
    node_config = context.node_config
    if keys.PARTITION_ID not in node_config:
        raise ValueError(f"node config has no {keys.PARTITION_ID!r}; start the SuperNode with --node-config")
    pid = int(node_config[keys.PARTITION_ID])
    if keys.NUM_PARTITIONS in node_config and not 0 <= pid < int(node_config[keys.NUM_PARTITIONS]):
        raise ValueError(f"node config: {keys.PARTITION_ID}={pid} is outside [0, {node_config[keys.NUM_PARTITIONS]})")
    return pid


def local_data(context: Context, runtime, pid: int):
    """The node's own JSONL file when its node config names one (``data-path``), else its partition."""
    path = context.node_config.get(keys.DATA_PATH)
    if not path:
        return runtime.partitions[pid]
    return datasets.Dataset.from_list([{**record, "label": 0} for record in read_alpaca_jsonl(str(path))])


def config_for_node(context: Context, config: RunConfig) -> RunConfig:
    """``config`` with this node's own device when its node config names one (``device``)."""
    device = context.node_config.get(keys.DEVICE)
    if device is None or device == "" or device == config.device:
        return config
    try:
        return replace(config, device=str(device))
    except ValueError as err:
        raise ValueError(f"node config: {keys.DEVICE}={device!r}: {err}") from err


def on_device(batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The batches, each tensor moved to ``device`` as it is drawn (a no-op on the CPU)."""
    for batch in batches:
        yield batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def handle_query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    metrics = MetricRecord({keys.PARTITION_ID: partition_id(context)})
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def handle_train(msg: Message, context: Context, config: RunConfig) -> Message:
    """One local round: load the server state, train on local batches, send state + extras.

    The reply's ``num-examples`` (FedAvg's weight) is the method's ``LocalResult.num_examples``:
    the built-in methods report the node's dataset size (``LocalTrainConfig.num_examples``, FedAvg's n_k).
    """
    if config.client_threads:
        torch.set_num_threads(config.client_threads)
    config = config_for_node(context, config)
    pid = partition_id(context)
    legacy = secagg.is_legacy_fit(msg.content)  # --secagg: SecAgg+'s collect stage, legacy FitIns records
    if legacy:
        arrays, round_config = secagg.unpack_fitins(msg.content)
    else:
        arrays = wire_decode(msg.content[keys.ARRAYS].to_torch_state_dict(), config.wire_dtype)
        round_config = msg.content[keys.CONFIG]
    result, sent_state = _train(context, config, pid, arrays, round_config)
    state = {k: v.detach().cpu().contiguous() for k, v in result.state.items()}
    clipping_norm = round_config.get(KEY_CLIPPING_NORM)
    if clipping_norm is not None:  # --dp client: clip the delta before it leaves the node
        state = clip_state(state, sent_state, float(clipping_norm))
    extras = {k: v.detach().cpu().contiguous() for k, v in result.extras.items()}
    if legacy:  # secaggplus_mod masks these arrays and sends only the masked vector
        return Message(secagg.pack_fitres({**state, **extras}, result.num_examples, result.train_loss), reply_to=msg)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: result.num_examples,
            keys.TRAIN_LOSS: result.train_loss,
            keys.STATE_BYTES: wire_bytes(state, config.wire_dtype),
            keys.EXTRAS_BYTES: wire_bytes(extras, config.wire_dtype),
        }
    )
    arrays_up = ArrayRecord(wire_encode({**state, **extras}, config.wire_dtype))
    content = RecordDict({keys.ARRAYS: arrays_up, keys.METRICS: metrics})
    return Message(content, reply_to=msg)


def _train(
    context: Context, config: RunConfig, pid: int, arrays: dict[str, torch.Tensor], round_config: ConfigRecord
) -> tuple[LocalResult, dict[str, torch.Tensor]]:
    """(the method's local round on this node's data, the state it started from) for the server's ``arrays``.

    The node's kept tensors (``context.state``, never sent) are restored before and saved after.
    """
    runtime = get_runtime(config)
    method, model = runtime.method, runtime.model
    server_round = int(round_config[keys.SERVER_ROUND])
    payload = json.loads(str(round_config.get(keys.PAYLOAD, "{}")))
    state_keys = set(method.get_state(model))
    method.set_state(model, {k: v for k, v in arrays.items() if k in state_keys})
    data = local_data(context, runtime, pid)
    train_config = LocalTrainConfig(
        config.learning_rate,
        config.weight_decay,
        budget=config.budgets()[pid],
        partition=pid,
        server_round=server_round,
        num_examples=len(data),
    )
    private = context.state.get(keys.PRIVATE)  # kept by Flower per node across rounds
    method.set_private_state(model, private.to_torch_state_dict() if private is not None else None)
    method.prepare_round(model, payload, {k: v for k, v in arrays.items() if k not in state_keys}, train_config)

    local_batches = batches(
        data,
        runtime.tokenizer,
        batch_size=config.batch_size,
        steps=config.local_steps,
        seed=derive_seed(config.seed, "batches", server_round, pid),
        max_length=config.max_length,
    )
    local_batches = on_device(local_batches, runtime.device)
    result = method.local_train(model, local_batches, train_config)
    kept = method.get_private_state(model)
    if kept:
        context.state[keys.PRIVATE] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in kept.items()})
    return result, {k: v for k, v in arrays.items() if k in state_keys}


def _secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages (``--secagg``); every other message passes through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to ``config``, or reading the Flower run config when ``None``."""
    app = ClientApp(mods=[_secagg_when_asked])

    def resolve(context: Context) -> RunConfig:
        return config if config is not None else RunConfig.from_flower(context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, resolve(context))

    return app


# For `flwr run .` and SuperNodes: the config comes from the run config.
app = make_client_app()
