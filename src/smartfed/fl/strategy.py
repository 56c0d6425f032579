"""SmartFed's Flower strategy: FedAvg with reproducible, partition-aware client sampling.

Flower's simulation gives nodes random ids each run, and ``FedAvg`` samples
with the global ``random``; a resumed run would then train other clients than
the run it continues. So the strategy first asks every node for its
``partition-id`` (a QUERY message) and samples partitions with an RNG seeded by
(seed, round, attempt). Aggregation is the method's (``Method.aggregate`` with
the combine rule of ``--aggregation``), run from ``aggregate_train`` so that
Flower's strategy wrappers (differential privacy) can sit around it.

What a round needs (method, combine rule, state and extras sent down, attempt)
comes in a ``RoundContext`` (``round.py``) bound for that round with ``bound``;
aggregation writes its results (updates, merged extras) into the same context.

Replies are decoded into ``validation.Candidate``s first; failed, missing and
malformed replies become (partition, node, reason) records for metrics.jsonl.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..methods import ClientUpdate, Combine, weighted_mean
from ..methods.aggregation import coordinate_median, norm_clipped, trimmed_mean
from ..run.config import RunConfig
from ..run.seeds import derive_seed
from . import keys
from .round import RoundContext
from .validation import Candidate
from .wire import decode as wire_decode
from .wire import encode as wire_encode


def combine_for(config: RunConfig, reference: Mapping[str, torch.Tensor]) -> Combine:
    """The combine rule of ``--aggregation`` (and ``--clip_update_norm`` around it) for this round."""
    combine: Combine = {
        "mean": weighted_mean,
        "median": coordinate_median,
        "trimmed_mean": trimmed_mean(config.trim_fraction),
    }[config.aggregation]
    if config.clip_update_norm > 0:
        combine = norm_clipped(combine, reference, config.clip_update_norm)
    return combine


_EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Exit|Interrupt))\b[^:]*: (\S.*)$")
_WRAPPERS = ("RayTaskError", "ClientAppException")  # the engines' own wrappers around the client's exception


def _last_exception(reason: str) -> str:
    """The client's own ``SomeError: message`` line of an error reason (engines wrap it in their tracebacks)."""
    lines = [
        f"{m[1].rsplit('.', 1)[-1]}: {m[2]}"
        for line in reason.splitlines()
        if (m := _EXCEPTION_LINE.match(line)) and not any(w in m[1] for w in _WRAPPERS)
    ]
    text = lines[-1].rstrip("'>") if lines else reason
    return " ".join(text.split())[:300]


NODE_WAIT_SECONDS = 600.0
"""The longest wait for ``num_clients`` nodes in all (deployment SuperNodes may start late)."""
NODE_STALL_SECONDS = 60.0
"""Fewer than ``num_clients`` nodes and no new one for this long: the federation is too small."""
NODE_STALL_ENV = "SMARTFED_NODE_WAIT"
NODE_LOG_SECONDS = 10.0


def node_stall_seconds() -> float:
    """``$SMARTFED_NODE_WAIT`` (seconds, positive) or ``NODE_STALL_SECONDS``."""
    raw = os.environ.get(NODE_STALL_ENV, "")
    if not raw:
        return NODE_STALL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{NODE_STALL_ENV}={raw!r} must be a positive number of seconds")
    return value


def too_few_nodes(connected: int, num_clients: int, waited: float) -> str:
    """The one-line error of a federation with fewer nodes than clients, naming what to change."""
    return (
        f"only {connected} of num-clients={num_clients} nodes connected after {waited:.0f} s (one node per client): "
        f'with `flwr run .` give the local simulation more SuperNodes (--federation-config "num-supernodes='
        f'{num_clients}"; Flower\'s default is 2) or fewer clients (--run-config "num-clients={connected}"); '
        f"on the deployment engine start {num_clients} SuperNodes (scripts/deploy_local.sh {num_clients}); "
        f"{NODE_STALL_ENV} sets how long to wait for a new node"
    )


def _scalar(metrics: MetricRecord, key: str) -> object:
    value = metrics.get(key)
    return value if isinstance(value, (int, float)) else None


class SmartFedStrategy(FedAvg):
    """FedAvg whose sampled clients depend only on (seed, round, attempt)."""

    def __init__(
        self, *, num_clients: int, sample_clients: int, seed: int, timeout: float = 3600.0, wire_dtype: str = "float32"
    ) -> None:
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
        self.wire_dtype = wire_dtype  # what the arrays travel in (fl/wire.py); everything here sees float32
        self.node_of_partition: dict[int, int] = {}
        self._round: RoundContext | None = None  # the round being served: set only inside ``bound``

    @contextmanager
    def bound(self, ctx: RoundContext) -> Iterator[RoundContext]:
        """Serve round ``ctx`` (``configure_train``, ``aggregate_train``) inside this block, and no other.

        Flower's ``Strategy`` methods have fixed signatures and the DP wrappers call them
        with those only, so the round's context cannot be an argument: it is bound here
        for the round and unbound after, never left behind for the next round to read.
        """
        if self._round is not None:
            raise RuntimeError(f"round {self._round.server_round} is still bound; rounds do not nest")
        self._round = ctx
        try:
            yield ctx
        finally:
            self._round = None

    def round_context(self) -> RoundContext:
        """The bound round; an error outside ``bound``."""
        if self._round is None:
            raise RuntimeError("SmartFedStrategy serves a round only inside `with strategy.bound(ctx)`")
        return self._round

    def discover(
        self,
        grid: Grid,
        *,
        wait_seconds: float = NODE_WAIT_SECONDS,
        stall_seconds: float | None = None,
        poll_seconds: float = 0.5,
    ) -> dict[int, int]:
        """Wait for ``num_clients`` nodes, then learn each node's partition id.

        Fails (``TimeoutError``, one line naming the settings to change) when no new
        node has connected for ``stall_seconds`` (default: ``$SMARTFED_NODE_WAIT`` or
        ``NODE_STALL_SECONDS``) while fewer than ``num_clients`` are there, or after
        ``wait_seconds`` in all: a federation with too few SuperNodes (``flwr run .``'s
        local simulation has 2 unless told otherwise) never waits in silence.
        """
        stall = node_stall_seconds() if stall_seconds is None else stall_seconds
        start = time.monotonic()
        count, changed, said = len(list(grid.get_node_ids())), start, start
        while count < self.num_clients:
            now = time.monotonic()
            if now - changed >= stall or now - start >= wait_seconds:
                raise TimeoutError(too_few_nodes(count, self.num_clients, now - start))
            if now - said >= NODE_LOG_SECONDS:  # say what it waits for, not a silent hang
                log(WARNING, "waiting for nodes: %d of num-clients=%d connected", count, self.num_clients)
                said = now
            time.sleep(poll_seconds)
            if (now_count := len(list(grid.get_node_ids()))) != count:
                count, changed = now_count, time.monotonic()
        queries = [
            Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=node)
            for node in grid.get_node_ids()
        ]
        # not the round timeout: a node's first message may wait for its ClientApp process to start
        for reply in grid.send_and_receive(queries, timeout=max(self.timeout, wait_seconds)):
            if reply.has_error():
                continue
            pid = int(reply.content[keys.METRICS][keys.PARTITION_ID])
            node = reply.metadata.src_node_id
            if not 0 <= pid < self.num_clients:
                raise ValueError(
                    f"node {node} holds partition-id={pid}, outside [0, {self.num_clients}) (num-clients); with "
                    f'`flwr run .` give as many SuperNodes as clients: --federation-config "num-supernodes='
                    f'{self.num_clients}"'
                )
            if pid in self.node_of_partition:
                raise ValueError(f"partition-id={pid} is claimed by nodes {self.node_of_partition[pid]} and {node}")
            self.node_of_partition[pid] = node
        missing = sorted(set(range(self.num_clients)) - set(self.node_of_partition))
        if missing:
            raise RuntimeError(f"no client answered for partition(s) {missing[:10]}")
        return self.node_of_partition

    def decode(self, replies: Iterable[Message], messages: Iterable[Message]) -> tuple[list[Candidate], list[dict]]:
        """(candidates to validate, failures) of the replies to one round's ``messages`` (already sent).

        A failure is a sampled client whose reply is an error (it raised, or its node
        is gone), is missing (timed out), or cannot be decoded at all. Replies are
        matched to messages by id: an error about a node may come from the SuperLink.
        """
        partition_of_node = {node: pid for pid, node in self.node_of_partition.items()}
        by_message = {m.metadata.message_id: partition_of_node[m.metadata.dst_node_id] for m in messages}
        waiting = set(by_message.values())
        candidates, failures = [], []
        for reply in replies:
            pid = by_message.get(reply.metadata.reply_to_message_id, partition_of_node.get(reply.metadata.src_node_id))
            node = self.node_of_partition.get(pid, reply.metadata.src_node_id)
            if pid not in waiting:  # unknown node, or a second reply: never aggregated
                failures.append({"partition": pid, "node": node, "reason": "unsolicited reply"})
                continue
            waiting.discard(pid)
            if reply.has_error():
                reason = f"client error {reply.error.code}: {_last_exception(reply.error.reason or '')}"
                failures.append({"partition": pid, "node": node, "reason": reason})
                continue
            content = reply.content
            if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
                failures.append({"partition": pid, "node": node, "reason": "reply lacks its arrays or metrics record"})
                continue
            try:
                arrays = wire_decode(content[keys.ARRAYS].to_torch_state_dict(), self.wire_dtype)
            except Exception as err:  # a malformed Array cannot become a tensor
                failures.append({"partition": pid, "node": node, "reason": f"arrays do not decode ({err})"[:300]})
                continue
            metrics = content[keys.METRICS]
            candidates.append(
                Candidate(pid, node, arrays, _scalar(metrics, keys.NUM_EXAMPLES), _scalar(metrics, keys.TRAIN_LOSS))
            )
        for pid in sorted(waiting):
            failures.append(
                {"partition": pid, "node": self.node_of_partition[pid], "reason": "no reply within the round timeout"}
            )
        return candidates, failures

    def hold(self, replies: Mapping[int, Message], accepted: Iterable[Candidate]) -> list[Message]:
        """The accepted replies with only the state in their ArrayRecord (server key order); extras held aside.

        Flower's DP wrappers clip every array of a reply against the state sent down,
        position by position: the reply must hold exactly those keys, in that order.
        The extras go to the bound round's ``held_extras`` until ``aggregate_train``.
        """
        ctx = self.round_context()
        out = []
        ctx.held_extras = {}
        for c in accepted:
            reply = replies[c.partition]
            reply.content[keys.ARRAYS] = ArrayRecord(torch_state_dict={k: c.arrays[k] for k in ctx.state})
            ctx.held_extras[c.partition] = {k: v for k, v in c.arrays.items() if k not in ctx.state}
            out.append(reply)
        return out

    @staticmethod
    def _update_of(ctx: RoundContext, pid: int, reply: Message, state_keys: list[str]) -> ClientUpdate:
        """Client ``pid``'s held reply as aggregation sees it: its state (clipped, under DP) and its held extras."""
        state = reply.content[keys.ARRAYS].to_torch_state_dict()
        if list(state) != state_keys:  # every reply went through ``hold``: only a bug gets here
            differ = sorted(set(state) ^ set(state_keys))[:3] or "the same keys in another order"
            raise RuntimeError(
                f"round {ctx.server_round}: the reply of client {pid} (node {reply.metadata.src_node_id}) holds "
                f"other state keys than the first reply ({differ}); each must hold the state sent down, in its order"
            )
        metrics = reply.content[keys.METRICS]
        return ClientUpdate(
            partition=pid,
            arrays={**state, **ctx.held_extras.get(pid, {})},
            num_examples=1 if ctx.uniform_weights else int(metrics[keys.NUM_EXAMPLES]),
            train_loss=float(metrics[keys.TRAIN_LOSS]),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's aggregation of (validated) replies; the state goes back as an ArrayRecord.

        The bound round receives the updates (by partition) and the merged extras.
        """
        ctx = self.round_context()
        held = list(replies)
        if not held:
            return None, None
        # the state keys of the first reply, in its order (the ArrayRecord returned keeps it); every reply must match
        state_keys = list(held[0].content[keys.ARRAYS].keys())
        partition_of_node = {node: pid for pid, node in self.node_of_partition.items()}
        updates = [
            self._update_of(ctx, partition_of_node[reply.metadata.src_node_id], reply, state_keys) for reply in held
        ]
        ctx.updates = sorted(updates, key=lambda u: u.partition)  # arrival order must not change the result
        merged = ctx.method.aggregate(ctx.updates, ctx.combine)
        ctx.merged_extras = {k: v for k, v in merged.items() if k not in state_keys}
        return ArrayRecord(torch_state_dict={k: merged[k] for k in state_keys}), MetricRecord(
            {"num-replies": len(updates)}
        )

    def sample_partitions(self, server_round: int, attempt: int = 0) -> list[int]:
        """The partitions sampled in ``attempt`` of ``server_round``: a function of (seed, round, attempt) only."""
        parts = ("sample", server_round) if attempt == 0 else ("sample", server_round, "retry", attempt)
        rng = random.Random(derive_seed(self.seed, *parts))
        return sorted(rng.sample(sorted(self.node_of_partition), self.sample_clients))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        ctx = self.round_context()
        config[keys.SERVER_ROUND] = server_round
        # Encoded here, inside any DP wrapper: the wrapper keeps the float32 state it clips replies against.
        down = wire_encode({**arrays.to_torch_state_dict(), **ctx.extras}, self.wire_dtype)
        arrays = ArrayRecord(torch_state_dict=down)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = [self.node_of_partition[p] for p in self.sample_partitions(server_round, ctx.attempt)]
        return self._construct_messages(record, nodes, MessageType.TRAIN)
