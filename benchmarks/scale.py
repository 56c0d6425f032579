"""Many clients on Flower's simulation engine: memory, seconds per round and the share of a round outside training.

One federated SmartFed run per client count (10, 50 and 100 by default), each through smartfed's
own ``run_simulation`` and ``RunConfig``, on a tiny random Llama and a pool of two tiny PEFT
adapters made on the spot (as the tests build them; nothing is downloaded), on the cheap
``arith`` task. 10 % of the clients are sampled per round; every client holds the same number
of examples and trains the same few steps, so what changes between the runs is only how many
clients the engine carries. Side by side:

- peak memory of the whole process tree of the run: the driver (ServerApp, Flower's simulation
  engine) and its descendants (Ray's GCS and raylet, the Ray workers that run the ClientApps),
  read from /proc every 0.2 s by a thread of this script (the run is a child process, so this
  script's own memory is left out). Summed PSS (shared pages split among the processes that map
  them: what the tree really holds) and summed RSS (shared pages counted once per process);
- seconds per round: the server's ``train_seconds`` of metrics.jsonl (sample, send, wait for the
  replies, validate, aggregate; the held-out evaluation is timed apart and runs only after the
  last round here), the median over rounds 2.. (round 1 also starts the Ray workers and builds
  each worker's model, shown apart);
- the share of a round spent outside client training: 1 - (time during which at least one
  client was inside ``Method.local_train``) / (the round's seconds). It is split into the
  client side outside training (decoding the state, encoding the reply; in round 1 building the
  model) and everything outside the ClientApps (Flower's messages, Ray's scheduling and
  serialisation, the server's sampling, validation and aggregation). The clients' intervals
  come from a Flower mod this script adds to smartfed's ClientApp (see ``timed_client_app``).

Targets printed beside the figures (never asserted): memory flat in the number of clients (peak
PSS at the most clients <= 1.2 x at the fewest) and the share outside training <= 20 % of a round
at the most clients. A benchmark, not a test: it exits 0 unless a run fails.

    .venv/bin/python benchmarks/scale.py                                # 10, 50, 100 clients, 4 rounds
    .venv/bin/python benchmarks/scale.py --clients 4,8 --rounds 1       # smoke run, about a minute
    .venv/bin/python benchmarks/scale.py --output results/scale/scale.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEMORY_TARGET = 1.2  # peak PSS at the most clients / at the fewest: "flat"
OVERHEAD_TARGET = 0.20  # share of a round outside client training, at the most clients
CHILD_FLAG = "--run-one"  # internal: this script started as the child that runs one federation


# --- the child: one federation, with the clients' training timed ---------------------------------------
def _timed_local_train(local_train: Callable[..., Any]) -> Callable[..., Any]:
    """``Method.local_train`` that notes its wall-clock interval, round and partition in ``timed.last``.

    The note lives on the wrapper, which stays on the worker's cached method: Flower ships the
    ClientApp (and with it this module's globals, pickled by value) anew with every message, so a
    module-level dict would be a different one at each message.
    """
    last: dict[str, Any] = {}

    def timed(*args: Any, **kwargs: Any) -> Any:  # (model, batches, LocalTrainConfig)
        config = kwargs["config"] if "config" in kwargs else args[2]
        start = time.time()
        try:
            return local_train(*args, **kwargs)
        finally:
            last.update(train=[start, time.time()], round=int(config.server_round), partition=int(config.partition))

    timed.smartfed_scale_last = last  # type: ignore[attr-defined]
    return timed


def timed_client_app(make_client_app: Callable[[Any], Any], config: Any, timings: str) -> Any:
    """smartfed's ClientApp for ``config`` behind a Flower mod that appends, per train message, the
    handler's and ``local_train``'s wall-clock intervals to the JSONL file ``timings``.

    Why a mod: the ClientApp runs inside Ray workers, and its replies carry no timing. Flower
    pickles the ClientApp to each worker; this function's module is the child's ``__main__``,
    which cloudpickle ships by value, so the workers need not import this script.
    """
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    inner = make_client_app(config)

    def timing_mod(msg: Message, context: Any, call_next: Callable[[Message, Any], Message]) -> Message:
        if not msg.metadata.message_type.startswith("train"):
            return call_next(msg, context)
        from smartfed.fl.runtime import get_runtime

        start = time.time()
        # built here rather than inside call_next (the same cached runtime), so that local_train can be wrapped
        method = get_runtime(config).method
        if not hasattr(method.local_train, "smartfed_scale_last"):
            method.local_train = _timed_local_train(method.local_train)
        last = method.local_train.smartfed_scale_last
        last.clear()
        reply = call_next(msg, context)
        record = {"pid": os.getpid(), "handler": [start, time.time()], **last}
        with open(timings, "a", encoding="utf-8") as fh:  # one write per line: O_APPEND keeps lines whole
            fh.write(json.dumps(record) + "\n")
        return reply

    app = ClientApp(mods=[timing_mod])

    @app.query()
    def query(msg: Message, context: Any) -> Message:
        return inner(msg, context)

    @app.train()
    def train(msg: Message, context: Any) -> Message:
        return inner(msg, context)

    return app


def run_one(config_path: str, timings: str) -> int:
    """The child: one federation of the RunConfig in ``config_path``, through smartfed's run_simulation."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is first imported
    from smartfed.fl import simulation
    from smartfed.run.config import RunConfig

    config = RunConfig.from_dict(json.loads(Path(config_path).read_text(encoding="utf-8")))
    original = simulation.make_client_app
    # run_simulation builds its ClientApp with this name: the timed one takes its place for this run only
    simulation.make_client_app = lambda cfg: timed_client_app(original, cfg, timings)
    try:
        simulation.run_simulation(config, progress=False)
    finally:
        simulation.make_client_app = original
    return 0


# --- the parent: assets, one child per client count, the process tree's memory ------------------------
def make_assets(root: Path, hidden: int, layers: int, rank: int) -> tuple[Path, list[Path]]:
    """A tiny random Llama with the char tokenizer, saved as a transformers folder, and two PEFT adapters."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from smartfed.data import char_tokenizer

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapters = []
    for i, name in enumerate(("math", "json")):
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0
        )
        peft_model = get_peft_model(copy.deepcopy(model), lora)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1 + i)
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0.0, 0.2, generator=gen)
        peft_model.save_pretrained(root / name)
        adapters.append(root / name)
    return root / "model", adapters


@dataclass
class TreePeaks:
    """Peaks of the process tree below (and including) one pid, read by a background thread."""

    root: int
    interval: float = 0.2
    rss: int = 0
    pss: int | None = 0
    processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _read(self) -> None:
        from smartfed.benchmark.hardware import tree_memory

        m = tree_memory(self.root)
        if m.processes == 0:
            return
        self.samples += 1
        self.rss = max(self.rss, m.rss)
        self.pss = None if m.pss is None or self.pss is None else max(self.pss, m.pss)
        self.processes = max(self.processes, m.processes)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> TreePeaks:
        self._read()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Round:
    number: int
    seconds: float  # the server's train_seconds: sample, send, wait, validate, aggregate
    clients: int  # replies timed by the mod
    train_union: float  # seconds during which at least one client was in local_train
    train_sum: float  # summed over the clients
    handler_union: float  # seconds during which at least one ClientApp handled a train message

    @property
    def outside(self) -> float:
        return max(self.seconds - self.train_union, 0.0) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def client_side(self) -> float:  # in the ClientApp, outside local_train
        return max(self.handler_union - self.train_union, 0.0) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def engine_side(self) -> float:  # outside every ClientApp: Flower, Ray, the server's own work
        return max(self.seconds - self.handler_union, 0.0) / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Result:
    clients: int
    sampled: int
    rounds: list[Round]
    wall: float  # the child process, start to exit
    peaks: TreePeaks
    eval_seconds: float

    @property
    def steady(self) -> list[Round]:
        return self.rounds[1:]

    def median(self, attr: str, rounds: Sequence[Round] | None = None) -> float:
        rows = self.steady if rounds is None else rounds
        return statistics.median(getattr(r, attr) for r in rows) if rows else float("nan")

    @property
    def setup(self) -> float:
        """Seconds of the run outside its rounds and evaluation: start-up (Ray, discovering every node), shutdown."""
        return self.wall - sum(r.seconds for r in self.rounds) - self.eval_seconds


def union_seconds(intervals: Sequence[Sequence[float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((float(a), float(b)) for a, b in intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def read_rounds(run_dir: Path, timings: Path) -> tuple[list[Round], float]:
    """The rounds of a finished run (metrics.jsonl + the mod's timings) and its evaluation seconds."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    records = []
    if timings.is_file():
        records = [json.loads(line) for line in timings.read_text(encoding="utf-8").splitlines() if line.strip()]
    rounds = []
    for row in rows:
        mine = [r for r in records if r.get("round") == row["round"] and "train" in r]
        rounds.append(
            Round(
                number=int(row["round"]),
                seconds=float(row["train_seconds"]),
                clients=len(mine),
                train_union=union_seconds([r["train"] for r in mine]),
                train_sum=sum(r["train"][1] - r["train"][0] for r in mine),
                handler_union=union_seconds([r["handler"] for r in mine]),
            )
        )
    eval_seconds = sum(float(row.get("eval_seconds") or 0.0) for row in rows)
    return rounds, eval_seconds


def sampled_for(clients: int, fraction: float) -> int:
    return max(1, round(clients * fraction))


def run_config_values(args: argparse.Namespace, clients: int, assets: tuple[Path, list[Path]], out: Path) -> dict:
    model, adapters = assets
    values: dict[str, Any] = dict(
        model_name_or_path=str(model),
        lora_pool=",".join(str(a) for a in adapters),
        method=args.method,
        task=args.task,
        num_clients=clients,
        sample_clients=sampled_for(clients, args.sample_fraction),
        num_rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        learning_rate=1e-2,
        topk_experts=4,
        lora_rank=args.rank,
        lora_alpha=2.0 * args.rank,
        num_train=clients * args.examples_per_client,  # the same data per client whatever their number
        num_test=4,
        max_length=args.max_length,
        max_new_tokens=2,
        eval_every=args.rounds + 1,  # evaluated once, after the last round: the rounds are training alone
        energy="none",
        client_threads=args.client_threads,
        seed=args.seed,
        output_dir=str(out),
    )
    from smartfed.run.config import RunConfig

    names = {f.name for f in dataclasses.fields(RunConfig)}
    if "device" in names:  # the CPU unless asked: "auto" would pick a GPU where there is one
        values["device"] = args.device
    elif args.device != "cpu":
        raise SystemExit(f"--device {args.device}: this smartfed's RunConfig has no device option")
    RunConfig(**values)  # its own checks, here rather than in the child
    return values


def run_child(values: dict, work: Path, clients: int, timeout: float, interval: float) -> Result:
    """One federation in a child process (its own session: the tree watched is the run's alone)."""
    run_dir, timings = work / f"clients{clients}", work / f"clients{clients}.timings.jsonl"
    config_path = work / f"clients{clients}.config.json"
    config_path.write_text(json.dumps(values), encoding="utf-8")
    timings.unlink(missing_ok=True)
    log_path = work / f"clients{clients}.log"
    start = time.perf_counter()
    with log_path.open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, str(config_path), str(timings)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own: stopped as a whole on timeout
        )
        try:
            with TreePeaks(child.pid, interval=interval) as peaks:
                rc = child.wait(timeout=timeout)
        except BaseException:  # timeout or Ctrl-C: stop the run's processes (this script's own children)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
    wall = time.perf_counter() - start
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"the run with {clients} clients failed (exit {rc}); end of {log_path}:\n{tail}")
    rounds, eval_seconds = read_rounds(run_dir, timings)
    return Result(clients, values["sample_clients"], rounds, wall, peaks, eval_seconds)


# --- report --------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.0%}"  # NaN: no round to take it from


def report(results: Sequence[Result], args: argparse.Namespace, machine: str) -> str:
    steady = "rounds 2.." if args.rounds > 1 else "round 1 (no later round: --rounds 1)"
    lines = [
        f"# SmartFed on Flower's simulation engine: {', '.join(str(r.clients) for r in results)} clients",
        "",
        f"- machine: {machine}",
        f"- model: tiny random Llama (hidden {args.hidden}, {args.layers} layers, char tokenizer), pool of 2 PEFT "
        f"adapters r = {args.rank} on q_proj, v_proj; method {args.method}, task {args.task}",
        f"- each run: {args.sample_fraction:.0%} of the clients sampled per round (at least 1), {args.rounds} "
        f"round(s), {args.local_steps} local steps of batch {args.batch_size}, {args.examples_per_client} examples "
        f"per client, client_threads {args.client_threads} (Ray runs os.cpu_count() / client_cpus clients at once), "
        "evaluation only after the last round",
        f"- s/round and shares: median over {steady}; round 1 also starts the Ray workers and builds their models",
        "",
        "| clients | sampled | peak memory, tree PSS MiB | tree RSS MiB | processes | start-up + shutdown s "
        "| s/round | round 1 s | client training s/round | outside training | of which in ClientApp | "
        "of which outside ClientApps | outside training per sampled client, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r.steady or r.rounds
        per_client = (
            statistics.median((x.seconds - x.train_union) / max(x.clients, 1) * 1e3 for x in rows)
            if rows
            else float("nan")
        )
        lines.append(
            f"| {r.clients} | {r.sampled} | {_mib(r.peaks.pss)} | {_mib(r.peaks.rss)} | {r.peaks.processes} | "
            f"{r.setup:.1f} | {r.median('seconds', rows):.2f} | {r.rounds[0].seconds:.2f} | "
            f"{r.median('train_union', rows):.2f} | {_pct(r.median('outside', rows))} | "
            f"{_pct(r.median('client_side', rows))} | {_pct(r.median('engine_side', rows))} | {per_client:.0f} |"
        )
    first, last = results[0], results[-1]
    lines += [""]
    if first.peaks.pss and last.peaks.pss:
        ratio = last.peaks.pss / first.peaks.pss
        verdict = "PASS" if ratio <= MEMORY_TARGET else "MISS"
        lines.append(
            f"memory: peak tree PSS with {last.clients} clients / with {first.clients}: {ratio:.2f} "
            f"(target <= {MEMORY_TARGET:.1f}, flat in the number of clients): {verdict}"
        )
    share = last.median("outside", last.steady or last.rounds)
    verdict = "PASS" if share <= OVERHEAD_TARGET else "MISS"
    lines += [
        f"overhead: share of a round outside client training with {last.clients} clients: {_pct(share)} "
        f"(target <= {OVERHEAD_TARGET:.0%}): {verdict}",
        "",
        "Columns: peak memory of the run's whole process tree (the driver with the ServerApp and Flower's engine, "
        "Ray's GCS and raylet, the Ray workers running the ClientApps), sampled every "
        f"{args.interval:g} s; PSS splits shared pages among the processes (what the tree holds), RSS counts them "
        "in every process. s/round: the server's train_seconds (sample, send, wait, validate, aggregate; the "
        "evaluation is timed apart). client training: the time during which at least one client was inside "
        "Method.local_train (clients run in parallel, one per Ray worker). outside training = 1 - client "
        "training / s/round; in ClientApp: decoding the state, encoding the reply (round 1: building the model); "
        "outside ClientApps: Flower's messages, Ray's scheduling and serialisation, the server's sampling, "
        "validation and aggregation. The last column is the absolute cost per sampled client, independent of "
        "the model's size: with a real model the same seconds are a smaller share of a longer round.",
        "",
        "Every round:",
        "",
        "| clients | round | s | clients timed | client training s (union / sum) | outside training |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for x in r.rounds:
            lines.append(
                f"| {r.clients} | {x.number} | {x.seconds:.2f} | {x.clients} | {x.train_union:.2f} / "
                f"{x.train_sum:.2f} | {_pct(x.outside)} |"
            )
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import platform

    import flwr
    import ray
    import torch

    from smartfed.benchmark.timing import machine_line as cpu_line

    return (
        f"{cpu_line(torch.device('cpu'))}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"flwr {flwr.__version__ if hasattr(flwr, '__version__') else '?'}, ray {ray.__version__}"
    )


# --- entry point ---------------------------------------------------------------------------------------
def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive client counts, got {text!r}")
    return sorted(set(counts))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=_counts, default=[10, 50, 100], help="client counts (default 10,50,100)")
    parser.add_argument("--sample-fraction", type=float, default=0.1, help="clients sampled per round (default 0.1)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (default 4: round 1 and 3 more)")
    parser.add_argument("--local-steps", type=int, default=8, help="local steps per client per round (default 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    # arith has ~1,575 distinct prompts: 10 per client keeps 100 clients (1,000 examples) within them
    parser.add_argument("--examples-per-client", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per training example")
    # ~1 M parameters: a client's round takes a few tenths of a second, so what the engine adds shows
    parser.add_argument("--hidden", type=int, default=128, help="the tiny model's hidden size")
    parser.add_argument("--layers", type=int, default=4, help="the tiny model's decoder layers")
    parser.add_argument("--rank", type=int, default=4, help="rank of each pool adapter (and of from-scratch LoRAs)")
    parser.add_argument("--method", default="smartfed", help="registered method (default smartfed)")
    parser.add_argument("--task", default="arith", help="registered task (default arith)")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads (and Ray CPUs) per client")
    parser.add_argument("--device", default="cpu", help="RunConfig.device of the runs (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory readings")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--output", type=Path, help="also write the report here (markdown)")
    parser.add_argument("--work-dir", type=Path, help="keep the run folders and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if not 0 < args.sample_fraction <= 1:
        parser.error(f"--sample-fraction must be in (0, 1]; got {args.sample_fraction}")
    for name in ("rounds", "local_steps", "batch_size", "examples_per_client", "hidden", "layers", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.hidden % 4:
        parser.error("--hidden must be a multiple of 4 (the tiny model has 4 attention heads)")
    if args.client_threads < 1:
        parser.error("--client-threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD_FLAG]:
        return run_one(*argv[1:3])
    args = parse_args(argv)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smartfed-scale-")))
        else:
            work = args.work_dir.resolve()
            work.mkdir(parents=True, exist_ok=True)
            for old in work.glob("clients*"):  # a fresh run folder per count: run_simulation refuses old ones
                if old.is_dir() and (old / "config.json").is_file():
                    import shutil

                    shutil.rmtree(old)
        assets = make_assets(work / "assets", args.hidden, args.layers, args.rank)
        results = []
        for clients in args.clients:
            values = run_config_values(args, clients, assets, work / f"clients{clients}")
            print(
                f"scale: {clients} clients, {values['sample_clients']} sampled per round, {args.rounds} round(s)...",
                file=sys.stderr,
                flush=True,
            )
            results.append(run_child(values, work, clients, args.timeout, args.interval))
        text = report(results, args, machine_line())
    text += f"\n(whole benchmark: {time.perf_counter() - started:.0f} s)\n"
    sys.stdout.write(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        staging = args.output.with_name(args.output.name + ".tmp")
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, args.output)  # a reader never sees half a report
    return 0


if __name__ == "__main__":
    sys.exit(main())
