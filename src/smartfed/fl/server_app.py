"""SmartFed's Flower ServerApp: rounds of sample → local training → FedAvg → method update.

The loop drives a Flower strategy (``SmartFedStrategy``, a FedAvg) through the
Message API, and after each round writes the run folder: a metrics line, a
router checkpoint, and the summary. ``resume=True`` continues from the last
checkpoint; sampling and local batches depend only on (seed, round, client), so
a resumed run ends with the same router as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from ..eval import evaluate_task
from ..methods import ClientUpdate
from . import keys
from .energy import EnergyMeter
from .run_config import RunConfig
from .run_folder import RunFolder
from .runtime import Runtime, get_runtime, tensor_bytes
from .strategy import SmartFedStrategy


def _evaluate(runtime: Runtime) -> dict[str, float]:
    config = runtime.config
    with torch.no_grad():
        result = evaluate_task(
            runtime.model,
            runtime.tokenizer,
            runtime.task,
            runtime.test,
            max_new_tokens=config.max_new_tokens,
            batch_size=16,
        )
    return {"score": float(result["score"]), "n": int(result["n"])}


def weighted_loss(updates: list[ClientUpdate]) -> float:
    """The clients' training loss averaged by examples (as FedAvg weighs them)."""
    total = sum(u.num_examples for u in updates)
    return sum(u.train_loss * u.num_examples for u in updates) / max(total, 1)


def _restore(folder: RunFolder, runtime: Runtime) -> tuple[int, dict[str, Any], dict[str, torch.Tensor], list]:
    """(last finished round, its payload, its extras, metrics rows up to it)."""
    last = folder.last_checkpoint()
    if last == 0:
        return 0, {}, {}, []
    tensors, payload = folder.load_checkpoint(last)
    state_keys = set(runtime.method.get_state(runtime.model))
    runtime.method.set_state(runtime.model, {k: v for k, v in tensors.items() if k in state_keys})
    runtime.method.restore_payload(runtime.model, payload)
    extras = {k: v for k, v in tensors.items() if k not in state_keys}
    rows = [row for row in folder.read_metrics() if row["round"] <= last]
    return last, payload, extras, rows


def run_server(grid: Grid, config: RunConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the federation of ``config``; returns the summary."""
    runtime = get_runtime(config)
    method, model = runtime.method, runtime.model
    folder = RunFolder(Path(config.output_dir).expanduser().resolve())
    log(INFO, "SmartFed run folder: %s", folder.path)
    folder.write_config(config.to_dict())
    folder.write_pool(runtime.pool)
    start, payload, extras, rows = _restore(folder, runtime) if resume else (0, {}, {}, [])
    if not resume:
        folder.write_metrics([])
        payload = {"quotas": model.quotas()} if hasattr(model, "quotas") else {}

    strategy = SmartFedStrategy(num_clients=config.num_clients, sample_clients=config.sample_clients, seed=config.seed)
    strategy.discover(grid)
    energy = EnergyMeter(config.energy, folder.path)
    started = time.monotonic()
    bar = tqdm(
        range(start + 1, config.num_rounds + 1),
        desc="rounds",
        disable=not progress,
        initial=start,
        total=config.num_rounds,
    )
    for server_round in bar:
        t0 = time.monotonic()
        energy.start()
        state = method.get_state(model)
        down = {**state, **extras}
        train_config = ConfigRecord({keys.PAYLOAD: json.dumps(payload, sort_keys=True)})
        messages = strategy.configure_train(server_round, ArrayRecord(torch_state_dict=down), train_config, grid)
        replies = list(grid.send_and_receive(messages, timeout=strategy.timeout))
        updates = strategy.client_updates(replies)
        if not updates:
            raise RuntimeError(f"round {server_round}: no client replied with a valid update")
        merged = method.aggregate(updates)
        method.set_state(model, {k: merged[k] for k in state})
        update = method.server_update(server_round, model, {k: v for k, v in merged.items() if k not in state})
        payload, extras = update.payload, update.extras

        ok = [r for r in replies if not r.has_error()]
        up_state = [int(r.content[keys.METRICS][keys.STATE_BYTES]) for r in ok]
        up_extras = [int(r.content[keys.METRICS][keys.EXTRAS_BYTES]) for r in ok]
        row: dict[str, Any] = {
            "round": server_round,
            "clients": strategy.sample_partitions(server_round),
            "clients_replied": len(ok),
            "train_loss": weighted_loss(updates),
            "bytes_down_per_client": tensor_bytes(down),
            "bytes_down": tensor_bytes(down) * len(replies),
            "bytes_up_state": sum(up_state),
            "bytes_up_extras": sum(up_extras),
            "bytes_up_per_client": (sum(up_state) + sum(up_extras)) / max(len(ok), 1),
            "bytes_up": sum(up_state) + sum(up_extras),
            **update.log,
        }
        if server_round % config.eval_every == 0 or server_round == config.num_rounds:
            result = _evaluate(runtime)
            row.update(eval_metric=runtime.task.metric, eval_score=result["score"], eval_n=result["n"])
        else:
            row.update(eval_metric=runtime.task.metric, eval_score=None, eval_n=0)
        folder.save_checkpoint(server_round, {**method.get_state(model), **extras}, payload)
        kwh, energy_method = energy.stop()
        row.update(wall_seconds=time.monotonic() - t0, energy_kwh=kwh, energy_method=energy_method)
        rows.append(row)
        folder.write_metrics(rows)
        bar.set_postfix(loss=row["train_loss"], score=row["eval_score"])

    summary = _summarise(config, rows, time.monotonic() - started)
    folder.write_summary(summary)
    return summary


def _summarise(config: RunConfig, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    scored = [r for r in rows if r.get("eval_score") is not None]
    energies = [r["energy_kwh"] for r in rows if r.get("energy_kwh") is not None]
    return {
        "method": config.method,
        "task": config.task,
        "rounds": len(rows),
        "final_round": rows[-1]["round"] if rows else 0,
        "final_eval_score": scored[-1]["eval_score"] if scored else None,
        "eval_metric": scored[-1]["eval_metric"] if scored else None,
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "wall_seconds_this_session": wall,
        "energy_kwh_total": sum(energies) if energies else None,
        "energy_method": rows[-1]["energy_method"] if rows else None,
        "config": asdict(config),
    }


def make_server_app(config: RunConfig | None = None, *, resume: bool = False, progress: bool = True) -> ServerApp:
    """A ServerApp bound to ``config``, or reading the Flower run config when ``None``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config if config is not None else RunConfig.from_flower(context.run_config)
        run_server(grid, run_config, resume=resume, progress=progress)

    return app


# For `flwr run .`: the config comes from [tool.flwr.app.config].
app = make_server_app()
