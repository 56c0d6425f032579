"""SmartFed's Flower ServerApp: rounds of sample → local training → FedAvg → method update.

The loop drives a Flower strategy (``SmartFedStrategy``, a FedAvg) through the
Message API, and after each round writes the run folder: a metrics line, a
router checkpoint, and the summary. ``resume=True`` continues from the last
checkpoint; sampling and local batches depend only on (seed, round, client), so
a resumed run ends with the same router as an uninterrupted one.

Faults (docs/reliability.md): every reply is validated (``validation.py``) and a
bad, failed or missing one is dropped and logged with its reason; a round with
fewer than ``min_fit_clients`` valid replies is re-sampled, skipped or ends the run
(``on_insufficient``). Each round writes its metrics line *before* its checkpoint:
a crash between the two resumes from the previous checkpoint, redoes the round and
replaces its line, so metrics.jsonl never loses nor repeats a round.

A round runs in four phases (``Federation``): collect the valid replies (retries,
SecAgg+, validation), aggregate them, evaluate, record. Its inputs to the strategy
travel in a ``RoundContext`` (``round.py``) bound to the strategy for that round;
aggregation's results come back in the same object, so one round's logic reads
top to bottom here instead of through attributes set and read on the strategy.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from ..errors import RunFailed
from ..eval import evaluate_task
from ..methods import ClientUpdate
from ..run.config import RunConfig
from ..run.folder import RunFolder
from . import keys, privacy, secagg
from .energy import EnergyMeter
from .round import RoundContext
from .runtime import Runtime, cpu_tensors, get_runtime
from .strategy import SmartFedStrategy, combine_for
from .validation import Candidate, ReplyRules, validate
from .wire import wire_bytes

# Fault injection for the crash-safety tests: "PHASE:ROUND" kills this process with
# SIGKILL at that point (phases: replied, metrics, checkpoint). Unset in normal runs.
FAILPOINT_ENV = "SMARTFED_FAILPOINT"


def _failpoint(phase: str, server_round: int) -> None:
    if os.environ.get(FAILPOINT_ENV) == f"{phase}:{server_round}":
        os.kill(os.getpid(), signal.SIGKILL)


def _evaluate(runtime: Runtime) -> dict[str, Any]:
    config = runtime.config
    with torch.no_grad():
        result = evaluate_task(
            runtime.model,
            runtime.tokenizer,
            runtime.task,
            runtime.test,
            max_new_tokens=config.max_new_tokens,
            batch_size=16,
            items=True,
        )
    return {"score": float(result["score"]), "n": int(result["n"]), "items": result.get("items", [])}


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
    runtime.method.restore_extras(runtime.model, extras)
    rows = [row for row in folder.read_metrics() if row["round"] <= last]
    return last, payload, extras, rows


def _rules(runtime: Runtime, config: RunConfig, state: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]):
    """Per-partition reply rules of this round (the method may expect per-client shapes)."""
    # --dp client: the clients promised to clip the state: hold them to it (float32 round-off aside)
    clip_bound = config.dp_clipping_norm * (1 + 1e-3) if config.dp == "client" else 0.0

    def rules(partition: int) -> ReplyRules:
        return ReplyRules(
            expected=cpu_tensors(runtime.method.expected_update(runtime.model, partition, extras)),
            reference={**state, **extras},
            max_update_norm=config.max_update_norm,
            protected=frozenset(state),
            max_state_norm=clip_bound,
            min_state_norm=1e-12 if config.dp == "server" else 0.0,
        )

    return rules


def _secure_attempt(
    grid: Grid, strategy: SmartFedStrategy, config: RunConfig, ctx: RoundContext, train_config: ConfigRecord
) -> tuple[list[Candidate], list[dict[str, Any]], dict[str, torch.Tensor] | None]:
    """One SecAgg+ attempt: (accepted clients, failures, the unmasked mean or None)."""
    sampled = strategy.sample_partitions(ctx.server_round, ctx.attempt)
    nodes = [strategy.node_of_partition[p] for p in sampled]
    merged, clients, error = secagg.secure_round(
        grid,
        ctx.server_round,
        nodes,
        {**ctx.state, **ctx.extras},
        train_config,
        clipping_range=config.secagg_clipping_range,
        max_weight=_secagg_max_weight(config),
        timeout=config.round_timeout,
    )
    if merged is not None and not all(bool(torch.isfinite(v).all()) for v in merged.values()):
        merged, error = None, "the unmasked aggregate is not finite"
    if merged is None:
        return [], [{"partition": None, "node": None, "reason": f"SecAgg+: {error}"}], None
    partition_of = {node: pid for pid, node in strategy.node_of_partition.items()}
    # arrays=merged: what each client sent has these names and sizes (the values stay masked)
    accepted = sorted(
        (Candidate(partition_of[node], node, merged, n, loss) for node, n, loss in clients), key=lambda c: c.partition
    )
    done = {c.partition for c in accepted}
    failures = [
        {"partition": p, "node": strategy.node_of_partition[p], "reason": "dropped out of SecAgg+"}
        for p in sampled
        if p not in done
    ]
    return accepted, failures, merged


def _secagg_max_weight(config: RunConfig) -> float:
    """SecAgg+'s bound on one client's weight (its num-examples): a weight above it may overflow the masked sum.

    Clients weigh by their method's ``LocalResult.num_examples``: for the built-in methods the node's
    dataset size (at most ``num_train``); a method that reports the examples it trained on may reach
    ``local_steps × batch_size``.
    """
    return float(max(config.num_train, config.local_steps * config.batch_size))


def run_server(grid: Grid, config: RunConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the federation of ``config``; returns the summary.

    The run folder is checked and locked first (``RunFolder.open_run``): a fresh run needs an
    empty folder, a resume the folder's own settings and adapters; the lock is re-entrant, so
    ``run_simulation`` and the CLI, which take it before Flower starts, keep holding it.
    """
    strategy = SmartFedStrategy(
        num_clients=config.num_clients,
        sample_clients=config.sample_clients,
        seed=config.seed,
        timeout=config.round_timeout,
        wire_dtype=config.wire_dtype,
    )
    # before the run folder is touched: a federation with too few nodes fails (bounded wait) leaving nothing
    strategy.discover(grid)
    folder = RunFolder(Path(config.output_dir).expanduser().resolve())
    with folder.open_run(config, resume=resume):
        return _serve(grid, config, folder, strategy, resume=resume, progress=progress)


def _serve(
    grid: Grid, config: RunConfig, folder: RunFolder, strategy: SmartFedStrategy, *, resume: bool, progress: bool
) -> dict[str, Any]:
    runtime = get_runtime(config)
    if resume:  # the adapters' weights, now that they are loaded: changed in place is another pool
        folder.check_resume(config, runtime.pool)
    log(INFO, "SmartFed run folder: %s", folder.path)
    folder.write_config(config.to_dict())
    folder.write_pool(runtime.pool)
    start, payload, extras, rows = _restore(folder, runtime) if resume else (0, {}, {}, [])
    if start == 0:  # a fresh run, or a resume of one killed before its first checkpoint
        folder.write_metrics([])
        payload = {"quotas": runtime.model.quotas()} if hasattr(runtime.model, "quotas") else {}

    federation = Federation(grid, config, folder, strategy, runtime, payload=payload, extras=extras, rows=rows)
    started = time.monotonic()
    bar = tqdm(
        range(start + 1, config.num_rounds + 1),
        desc="rounds",
        disable=not progress,
        initial=start,
        total=config.num_rounds,
    )
    for server_round in bar:
        row = federation.run_round(server_round)
        bar.set_postfix(loss=row["train_loss"], score=row["eval_score"])

    summary = _summarise(config, rows, time.monotonic() - started)
    folder.write_summary(summary)
    if summary["status"] == "failed":
        log(INFO, "SmartFed run failed: %s", summary["reason"])
    return summary


@dataclass
class Collected:
    """What the collect phase hands to aggregation: the round's valid replies and what was dropped on the way."""

    accepted: list[Candidate] = field(default_factory=list)  # valid replies of the last attempt, by partition
    dropped: list[dict[str, Any]] = field(default_factory=list)  # (partition, node, reason, attempt), all attempts
    sent: int = 0  # messages configured, all attempts (what bytes_down counts)
    replies: list[Message] = field(default_factory=list)  # the last attempt's replies (plain rounds)
    secure: dict[str, torch.Tensor] | None = None  # SecAgg+'s unmasked mean (--secagg rounds)
    skipped: bool = False  # fewer than min_fit_clients valid replies after every attempt


@dataclass
class Aggregated:
    """What the aggregate phase gives: the payload and extras the next round sends, and this round's log."""

    payload: dict[str, Any]
    extras: dict[str, torch.Tensor]
    log: dict[str, Any] = field(default_factory=dict)  # the method's server_update log (into metrics.jsonl)
    updates: list[ClientUpdate] = field(default_factory=list)  # the aggregated replies (the round's train loss)
    dp: dict[str, Any] | None = None  # this round's DP accounting entry (--dp)


class Federation:
    """One run's rounds, each in four phases: collect replies, aggregate, evaluate, record.

    It holds what lives from round to round (the payload and extras sent down next, the
    metrics rows, the DP history); a round's own values live in its ``RoundContext``, bound
    to the strategy for the round, and in the phases' results (``Collected``, ``Aggregated``).
    """

    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        folder: RunFolder,
        strategy: SmartFedStrategy,
        runtime: Runtime,
        *,
        payload: dict[str, Any],
        extras: dict[str, torch.Tensor],
        rows: list[dict[str, Any]],
    ) -> None:
        self.grid, self.config, self.folder, self.strategy, self.runtime = grid, config, folder, strategy, runtime
        self.trainer = privacy.dp_strategy(strategy, config)  # Flower's DP wrapper around the strategy, or itself
        self.payload, self.extras, self.rows = payload, extras, rows
        self.dp_history = [r["dp"]["noise_multiplier_effective"] for r in rows if r.get("dp")]
        self.energy = EnergyMeter(config.energy, folder.path)

    def run_round(self, server_round: int) -> dict[str, Any]:
        """One round, its metrics line written and its checkpoint saved; returns the line."""
        t0 = time.monotonic()
        self.energy.start()  # training: sampling, local training, aggregation (the claims' costs)
        method = self.runtime.method
        state = cpu_tensors(method.get_state(self.runtime.model))
        ctx = RoundContext(
            server_round,
            method,
            combine_for(self.config, state),
            state,
            self.extras,
            uniform_weights=self.config.dp != "none",
        )
        with self.strategy.bound(ctx):
            collected = self.collect(ctx)
            outcome = self.aggregate(ctx, collected)
        train_kwh, energy_method = self.energy.stop()
        row = self._row(ctx, collected, outcome)
        row.update(train_seconds=time.monotonic() - t0, train_kwh=train_kwh)
        row.update(self.evaluate(server_round))
        kwh = None if train_kwh is None else train_kwh + (row["eval_kwh"] or 0.0)
        row.update(wall_seconds=time.monotonic() - t0, energy_kwh=kwh, energy_method=energy_method)
        self.record(server_round, row, outcome)
        return row

    # --- phase 1: collect -------------------------------------------------------------------------------
    def collect(self, ctx: RoundContext) -> Collected:
        """The round's valid replies: sample, send, decode, validate; re-sample while too few (``retry``).

        A round short of ``min_fit_clients`` valid replies after every attempt is skipped,
        or ends the run (``on_insufficient='fail'``).
        """
        config = self.config
        rules = _rules(self.runtime, config, ctx.state, ctx.extras)
        collected = Collected()
        for attempt in range(config.round_retries + 1 if config.on_insufficient == "retry" else 1):
            ctx.attempt = attempt
            failures, candidates = self._attempt(ctx, collected, rules)
            for entry in failures + [
                {"partition": c.partition, "node": c.node, "reason": c.reason} for c in candidates if c.reason
            ]:
                log(INFO, "round %d: dropped client %s (node %s): %s", ctx.server_round, *entry.values())
                collected.dropped.append({**entry, "attempt": attempt})
            if len(collected.accepted) >= config.min_fit_clients:
                break
            log(
                INFO,
                "round %d: %d valid replies < min_fit_clients=%d (attempt %d)",
                ctx.server_round,
                len(collected.accepted),
                config.min_fit_clients,
                attempt,
            )
        collected.skipped = len(collected.accepted) < config.min_fit_clients
        if collected.skipped and config.on_insufficient == "fail":
            raise RunFailed(
                f"round {ctx.server_round}: {len(collected.accepted)} valid client replies, fewer than "
                f"min_fit_clients={config.min_fit_clients} (on_insufficient='fail'); dropped: {collected.dropped}"
            )
        return collected

    def _attempt(
        self, ctx: RoundContext, collected: Collected, rules: Callable[[int], ReplyRules]
    ) -> tuple[list[dict[str, Any]], list[Candidate]]:
        """One sampling of the round: (failures, decoded replies); sets ``collected``'s accepted replies."""
        train_config = ConfigRecord({keys.PAYLOAD: json.dumps(self.payload, sort_keys=True)})
        state = ArrayRecord(torch_state_dict=ctx.state)
        messages = list(self.trainer.configure_train(ctx.server_round, state, train_config, self.grid))
        collected.sent += len(messages)
        if self.config.secagg:  # the messages above are not sent: SecAgg+ runs its own four exchanges
            accepted, failures, collected.secure = _secure_attempt(
                self.grid, self.strategy, self.config, ctx, train_config
            )
            collected.accepted = accepted
            return failures, []
        collected.replies = list(self.grid.send_and_receive(messages, timeout=self.strategy.timeout))
        _failpoint("replied", ctx.server_round)
        candidates, failures = self.strategy.decode(collected.replies, messages)
        collected.accepted = validate(candidates, rules)
        return failures, candidates

    # --- phase 2: aggregate -----------------------------------------------------------------------------
    def aggregate(self, ctx: RoundContext, collected: Collected) -> Aggregated:
        """The method's aggregate of the valid replies loaded into the model, then its server update.

        A skipped round changes nothing: the payload and extras go down again as they were.
        """
        if collected.skipped:
            return Aggregated(self.payload, self.extras)
        method, model = ctx.method, self.runtime.model
        if self.config.secagg:  # the server only learns the (unmasked) mean: no per-client arrays
            merged = collected.secure
            assert merged is not None  # min_fit_clients >= 1 valid replies: SecAgg+ unmasked their mean
            merged_extras = {k: v for k, v in merged.items() if k not in ctx.state}
            updates = [
                ClientUpdate(c.partition, {}, int(c.num_examples), float(c.train_loss)) for c in collected.accepted
            ]
        else:
            merged = self._aggregate_replies(ctx, collected)
            merged_extras, updates = ctx.merged_extras, ctx.updates
        method.set_state(model, {k: merged[k].to(ctx.state[k].dtype) for k in ctx.state})
        update = method.server_update(ctx.server_round, model, merged_extras)
        outcome = Aggregated(update.payload, cpu_tensors(update.extras), update.log, updates)
        if not self.config.secagg and self.config.dp != "none":
            outcome.dp, z_eff = privacy.round_log(self.config, len(collected.accepted), self.dp_history)
            self.dp_history.append(z_eff)
        return outcome

    def _aggregate_replies(self, ctx: RoundContext, collected: Collected) -> dict[str, torch.Tensor]:
        """The aggregated state, through the (DP-wrapped) strategy; the merged extras land in ``ctx``."""
        reply_of = {
            c.partition: r for r in collected.replies for c in collected.accepted if c.node == r.metadata.src_node_id
        }
        held = self.strategy.hold(reply_of, collected.accepted)
        aggregated, _ = self.trainer.aggregate_train(ctx.server_round, held)
        if aggregated is None:
            raise RuntimeError(f"round {ctx.server_round}: aggregation returned nothing from {len(held)} replies")
        return aggregated.to_torch_state_dict()

    def _row(self, ctx: RoundContext, collected: Collected, outcome: Aggregated) -> dict[str, Any]:
        """The round's metrics line up to its timings: who took part, what was dropped, bytes each way, the log."""
        wire, accepted = self.config.wire_dtype, collected.accepted
        down = {**ctx.state, **ctx.extras}
        up_state = [wire_bytes({k: v for k, v in c.arrays.items() if k in ctx.state}, wire) for c in accepted]
        up_extras = [wire_bytes({k: v for k, v in c.arrays.items() if k not in ctx.state}, wire) for c in accepted]
        row: dict[str, Any] = {
            "round": ctx.server_round,
            "clients": self.strategy.sample_partitions(ctx.server_round, ctx.attempt),
            "clients_replied": len(accepted),
            "attempts": ctx.attempt + 1,
            "skipped": collected.skipped,
            "dropped": collected.dropped,
            "train_loss": weighted_loss(outcome.updates) if outcome.updates else None,
            "wire_dtype": wire,
            "bytes_down_per_client": wire_bytes(down, wire),
            "bytes_down": wire_bytes(down, wire) * collected.sent,
            "bytes_up_state": sum(up_state),
            "bytes_up_extras": sum(up_extras),
            "bytes_up_per_client": (sum(up_state) + sum(up_extras)) / max(len(accepted), 1),
            "bytes_up": sum(up_state) + sum(up_extras),
            **outcome.log,
        }
        if outcome.dp is not None:
            row["dp"] = outcome.dp
        return row

    # --- phase 3: evaluate ------------------------------------------------------------------------------
    def evaluate(self, server_round: int) -> dict[str, Any]:
        """The round's eval fields: held-out score every ``eval_every`` rounds and in the last, else none."""
        config, runtime = self.config, self.runtime
        t_eval, eval_kwh = time.monotonic(), None
        if server_round % config.eval_every == 0 or server_round == config.num_rounds:
            self.energy.start()  # evaluation apart: it is the server's, not part of reaching the task
            result = _evaluate(runtime)
            eval_kwh, _ = self.energy.stop()
            fields = {"eval_metric": runtime.task.metric, "eval_score": result["score"], "eval_n": result["n"]}
            fields["eval_items"] = result["items"]  # per held-out item, in order: paired, item-resampled intervals
        else:
            fields = {"eval_metric": runtime.task.metric, "eval_score": None, "eval_n": 0}
        return {**fields, "eval_seconds": time.monotonic() - t_eval, "eval_kwh": eval_kwh}

    # --- phase 4: record --------------------------------------------------------------------------------
    def record(self, server_round: int, row: dict[str, Any], outcome: Aggregated) -> None:
        """The metrics line, then the checkpoint (see the module docstring); the next round sends ``outcome``'s."""
        self.payload, self.extras = outcome.payload, outcome.extras
        self.rows.append(row)
        self.folder.write_metrics(self.rows)  # before the checkpoint: see the module docstring
        _failpoint("metrics", server_round)
        state = cpu_tensors(self.runtime.method.get_state(self.runtime.model))
        self.folder.save_checkpoint(server_round, {**state, **cpu_tensors(self.extras)}, self.payload)
        _failpoint("checkpoint", server_round)


def failure_reason(rows: list[dict[str, Any]]) -> str | None:
    """Why a run's rounds trained nothing, or None when they did: every round skipped, or a loss not finite."""
    if not rows:
        return None
    if all(r.get("skipped") for r in rows):
        reasons = sorted({d["reason"] for r in rows for d in r.get("dropped", [])})
        shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        return f"every round ({len(rows)}) was skipped: no round had min_fit_clients valid client replies" + (
            f" (dropped: {shown})" if shown else ""
        )
    bad = [r["round"] for r in rows if r.get("train_loss") is not None and not math.isfinite(r["train_loss"])]
    if bad:
        return f"the training loss is not finite in round(s) {bad}"
    return None


def _summarise(config: RunConfig, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    scored = [r for r in rows if r.get("eval_score") is not None]
    energies = [r["energy_kwh"] for r in rows if r.get("energy_kwh") is not None]
    train_kwh = [r["train_kwh"] for r in rows if r.get("train_kwh") is not None]
    up, down = sum(r["bytes_up"] for r in rows), sum(r["bytes_down"] for r in rows)
    reason = failure_reason(rows)
    return {
        "status": "failed" if reason else "completed",
        "reason": reason,
        "method": config.method,
        "task": config.task,
        "rounds": len(rows),
        "final_round": rows[-1]["round"] if rows else 0,
        "final_eval_score": scored[-1]["eval_score"] if scored else None,
        "eval_metric": scored[-1]["eval_metric"] if scored else None,
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "wire_dtype": config.wire_dtype,
        "bytes_up_total": up,
        "bytes_down_total": down,
        # as the FlowerTune LLM leaderboard counts communication: up + down, all clients, all rounds
        "bytes_total": up + down,
        "train_seconds_total": sum(r.get("train_seconds", 0.0) for r in rows),
        "eval_seconds_total": sum(r.get("eval_seconds", 0.0) for r in rows),
        "train_kwh_total": sum(train_kwh) if train_kwh else None,
        "wall_seconds_this_session": wall,
        "energy_kwh_total": sum(energies) if energies else None,
        "energy_method": rows[-1]["energy_method"] if rows else None,
        "config": asdict(config),
    }


def make_server_app(
    config: RunConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    errors: list[BaseException] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config``, or reading the Flower run config when ``None``.

    ``errors`` receives the exception that ended the ServerApp (it is re-raised too), so the
    caller of Flower's engine can raise the very error however the engine reports it.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_config = config if config is not None else RunConfig.from_flower(context.run_config)
            summary = run_server(grid, run_config, resume=resume, progress=progress)
            if summary["status"] == "failed":  # after summary.json is written: the folder keeps the reason
                where = Path(run_config.output_dir) / "summary.json"
                raise RunFailed(f"run failed: {summary['reason']} (see {where})")
        except Exception as err:
            if errors is not None:
                errors.append(err)
            raise

    return app


# For `flwr run .`: the config comes from [tool.flwr.app.config].
app = make_server_app()
