"""Secure aggregation of a round with Flower's SecAgg+ (Bell et al., 2020), for ``--secagg``.

Flower 1.41 implements SecAgg+ as a *legacy* workflow: ``SecAggPlusWorkflow`` drives a
``flwr.server.strategy.Strategy`` through a ``LegacyContext`` (``configure_fit`` →
``FitIns``, unnamed parameter lists), and the client side is ``secaggplus_mod`` around a
handler that answers with legacy ``fitres.*`` records. This module bridges one SmartFed
round to it: the state and extras go down as one parameter list whose key names travel
in the fit config; each client trains as usual (``client_app.handle_train``), and its
state and extras come back masked, so the server only learns their example-weighted sum.

What the server cannot do under SecAgg+: validate a single reply (it never sees one),
apply robust combines, or clip per client. Values are clipped to ±``clipping_range`` and
quantised to 2²² levels before masking (Flower's rule): keep the routers and the
method's statistics inside that range (``--secagg_clipping_range``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from . import keys

KEY_NAMES = "smartfed-keys"  # JSON list: the names of the unnamed legacy parameter list, in order


def is_legacy_fit(content: RecordDict) -> bool:
    """True for a SecAgg+ collect-stage message (legacy ``fitins.*`` records)."""
    return "fitins.parameters" in content.array_records


def unpack_fitins(content: RecordDict) -> tuple[dict[str, torch.Tensor], ConfigRecord]:
    """(named tensors, config) of a legacy FitIns message."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    names = json.loads(str(fitins.config[KEY_NAMES]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in zip(names, arrays, strict=True)}
    return tensors, ConfigRecord(dict(fitins.config))


def pack_fitres(arrays: Mapping[str, torch.Tensor], num_examples: int, train_loss: float) -> RecordDict:
    """A legacy FitRes reply; the key order goes in its metrics (the server checks all clients agree)."""
    names = list(arrays)
    fitres = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=ndarrays_to_parameters([arrays[n].detach().cpu().numpy() for n in names]),
        num_examples=num_examples,
        metrics={KEY_NAMES: json.dumps(names), keys.TRAIN_LOSS: train_loss},
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


class _Bridge(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow asks: our sampled nodes in, the unmasked mean out."""

    def __init__(self, grid: Grid, nodes: list[int], config: dict[str, object]) -> None:
        self.grid, self.nodes, self.config = grid, nodes, config
        self.result: tuple[list[str], list[np.ndarray]] | None = None
        self.clients: list[tuple[int, int, float]] = []  # (node, num_examples, train_loss)
        self.error: str | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return [(GridClientProxy(n, self.grid, 0), FitIns(parameters, dict(self.config))) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results, failures):
        names = {str(res.metrics[KEY_NAMES]) for _, res in results}
        if len(names) != 1:
            self.error = f"clients sent different keys under SecAgg+: {sorted(names)[:2]}"
            return None, {}
        self.clients = [(p.node_id, int(r.num_examples), float(r.metrics[keys.TRAIN_LOSS])) for p, r in results]
        # every result carries the same unmasked aggregate (Flower's backward-compatibility path)
        self.result = (json.loads(names.pop()), parameters_to_ndarrays(results[0][1].parameters))
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_round(
    grid: Grid,
    server_round: int,
    nodes: list[int],
    down: Mapping[str, torch.Tensor],
    config: ConfigRecord,
    *,
    clipping_range: float,
    max_weight: float,
    timeout: float,
) -> tuple[dict[str, torch.Tensor] | None, list[tuple[int, int, float]], str | None]:
    """(example-weighted mean of the clients' arrays, [(node, examples, loss)], why it failed) of one round."""
    names = list(down)
    fit_config = {**dict(config), KEY_NAMES: json.dumps(names), keys.SERVER_ROUND: server_round}
    bridge = _Bridge(grid, nodes, fit_config)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=bridge
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    params = ndarrays_to_parameters([down[n].detach().cpu().numpy() for n in names])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled client shares with every other (n is small)
        reconstruction_threshold=0.5,
        max_weight=max_weight,
        clipping_range=clipping_range,
        timeout=timeout,
    )
    workflow(grid, context)
    if bridge.result is None:
        return None, [], bridge.error or "SecAgg+ halted (too few clients completed a stage)"
    out_names, arrays = bridge.result
    merged = {n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in zip(out_names, arrays, strict=True)}
    return merged, bridge.clients, None
