"""The ``smartfed`` command line."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ANTICIPATED, one_line

# pretty_exceptions_show_locals=False: a traceback (a bug, or --debug) never prints the frames'
# local variables, so a config, a token or a prompt never ends up in a log.
app = typer.Typer(
    help="SmartFed: federated routing of rank-one experts from existing LoRA adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
pool_app = typer.Typer(help="Inspect LoRA pools.", no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(pool_app, name="pool")
zoo_app = typer.Typer(
    help="The example LoRA pool of the default benchmark.", no_args_is_help=True, pretty_exceptions_show_locals=False
)
app.add_typer(zoo_app, name="zoo")


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """An anticipated error raised anywhere in ``command`` (inside Flower's ServerApp too): ``error: …``, exit 2.

    ``--debug`` (the command's ``debug`` argument) re-raises it with its traceback.
    """

    @functools.wraps(command)  # keeps the signature (and a set __signature__) typer reads the options from
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ANTICIPATED as err:
            _error_exit(err, bool(kwargs.get("debug", False)))

    return wrapper


def _demo(
    tiny: Annotated[bool, typer.Option("--tiny", help="The 20-second tiny-model demo instead.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --tiny demo.")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    **values: Any,
) -> None:
    """Compose two skill adapters of the example zoo on SmolLM2-135M with SmartFed, against the baselines."""
    if tiny:
        from .demo import run_demo

        run_demo(Console(), seed=seed)
        return
    from .benchmark.runner import CompositionConfig, run_composition

    try:
        config = CompositionConfig(**values)
    except ValueError as err:
        _error_exit(err, debug)
    try:
        run_composition(config, Console())
    except (FileNotFoundError, ValueError) as err:
        _error_exit(err, debug)


def _demo_signature() -> inspect.Signature:
    from .benchmark.runner import CompositionConfig

    base = [
        p
        for p in inspect.signature(_demo, eval_str=True).parameters.values()
        if p.kind != inspect.Parameter.VAR_KEYWORD
    ]
    return inspect.signature(_demo, eval_str=True).replace(parameters=base + _dataclass_options(CompositionConfig))


@pool_app.command("inspect")
@_one_line_errors
def pool_inspect(
    sources: Annotated[list[str], typer.Argument(help="PEFT adapter folders or Hub ids.")],
) -> None:
    """Show the adapters of a pool and the experts it gives each target matrix."""
    from .more import LoraPool

    console = Console()
    try:
        pool = LoraPool.load(sources)
    except (FileNotFoundError, ValueError) as err:
        _error_exit(err)
    table = Table(title=escape(repr(pool)))  # "[math(r=4), ...]" would otherwise be read as rich markup
    for column in ("adapter", "rank", "alpha", "rsLoRA", "matrices", "base model", "sha256"):
        table.add_column(column)
    for a in pool.adapters:
        table.add_row(
            a.name,
            str(a.rank),
            f"{a.alpha:g}",
            str(a.use_rslora),
            str(len(a.target_modules)),
            str(a.base_model_name_or_path),
            a.sha256[:12],
        )
    console.print(table)
    sizes = {m.num_experts for m in pool.modules.values()}
    console.print(f"{len(pool.modules)} target matrices, experts per matrix: {sorted(sizes)}")


def _error_exit(err: BaseException | str, debug: bool = False) -> NoReturn:
    """``error: <message>`` on one unwrapped stderr line, exit code 2."""
    if debug and isinstance(err, BaseException):
        raise err
    message = one_line(err) if isinstance(err, BaseException) else " ".join(err.split())
    typer.echo(typer.style("error:", fg="red") + " " + message, err=True)
    raise typer.Exit(2)


def _run_options() -> list[inspect.Parameter]:
    """One CLI option per RunConfig field, spelled as in the paper's reference CLI (--num_rounds)."""
    from .run.config import RunConfig

    params = []
    for f in fields(RunConfig):
        kind = {int: int, float: float, bool: bool}.get(type(f.default), str)
        names = [f"--{f.name}"]
        if kind is bool:
            names = [f"--{f.name}/--no_{f.name}"]
        option = typer.Option(None, *names, help=f.metadata.get("help", ""), show_default=False)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])
        )
    return params


def _run(
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML/YAML/JSON file of the same keys.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete the previous SmartFed run in --output_dir first.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    **flags: Any,
) -> None:
    """Run a federation on Flower's simulation engine; writes a run folder under --output_dir."""
    from contextlib import ExitStack

    from .fl.simulation import run_simulation
    from .methods import check_sources
    from .run.config import RunConfig
    from .run.folder import RunFolder

    stack = ExitStack()  # holds the run folder's lock from the checks to the end of the run
    try:
        values: dict[str, Any] = {}
        if resume is not None:
            values.update(RunFolder(resume).read_config())
            values["output_dir"] = str(resume)
        if config is not None:
            values.update(RunConfig.from_file(config))
        values.update({k: v for k, v in flags.items() if v is not None})
        run_config = RunConfig.from_dict(values, source=str(config or "flags"))
        if resume is not None and Path(run_config.output_dir).expanduser().resolve() != resume.expanduser().resolve():
            raise ValueError(
                f"--resume {resume} with --output_dir {run_config.output_dir}: a resume continues the run in its "
                "own folder (drop --output_dir, or start a new run there without --resume)"
            )
        check_sources(run_config)
        if resume is not None:  # a damaged run folder fails here, not inside Flower
            folder = RunFolder(resume)
            folder.read_metrics()
            if folder.last_checkpoint():
                folder.load_checkpoint(folder.last_checkpoint())
        pool = _check_paths(run_config)
        folder = RunFolder(run_config.output_dir)  # refused here, with nothing written, or locked
        stack.enter_context(folder.open_run(run_config, resume=resume is not None, overwrite=overwrite, pool=pool))
    except (ValueError, OSError) as err:
        stack.close()
        _error_exit(err, debug)
    with stack:
        run_simulation(run_config, resume=resume is not None, verbose=verbose)
    summary = Path(run_config.output_dir) / "summary.json"
    Console().print(f"run folder: {run_config.output_dir}  (summary: {summary})")


def _check_paths(config, methods: Optional[list[str]] = None) -> Any:
    """Fail before starting Flower when a local path the run needs is missing, or the method cannot use it.

    ``methods``: the methods that will run over the pool (default: ``config.method``); each parses
    its ``--method_options`` and checks the pool (e.g. SmartFed's ``--topk_experts``) here.
    Returns the loaded pool (or None).
    """
    from dataclasses import replace

    from .methods import get_method_class, load_builtin_methods
    from .more import LoraPool
    from .run.pools import resolve_pool

    load_builtin_methods()
    runners = [get_method_class(name)(replace(config, method=name)) for name in methods or [config.method]]
    pool = LoraPool.load(resolve_pool(config.lora_pool)) if config.lora_pool else None  # names a broken adapter
    model = Path(config.model_name_or_path).expanduser()
    if config.model_name_or_path.startswith((".", "/", "~")) and not model.exists():
        raise FileNotFoundError(f"--model_name_or_path {config.model_name_or_path}: no such folder")
    if model.is_dir() and not (model / "config.json").is_file():
        raise ValueError(f"--model_name_or_path {config.model_name_or_path}: no config.json (not a transformers model)")
    if model.is_file() and model.suffix != ".gguf":
        raise ValueError(f"--model_name_or_path {config.model_name_or_path}: a file, but not a .gguf model")
    if model.is_file():
        from .models import resolve_model

        resolve_model(str(model))  # a GGUF that is not a model fails here (a real one is converted once, cached)
    from .data import load_task

    load_task(config.task, seed=config.seed, num_train=config.num_train, num_test=config.num_test)  # bad data files
    for runner in runners if pool is not None else []:  # last: the paths' own errors come first
        runner.check_pool(pool)
    return pool


_run.__signature__ = inspect.signature(_run, eval_str=True).replace(  # type: ignore[attr-defined]
    parameters=[
        p for p in inspect.signature(_run, eval_str=True).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD
    ]
    + _run_options()
)
app.command("run")(_one_line_errors(_run))


def _dataclass_options(cls: type) -> list[inspect.Parameter]:
    """One ``--field`` option per dataclass field, with the field's help (used by ``zoo build``)."""
    params = []
    for f in fields(cls):
        option = typer.Option(f.default, f"--{f.name}", help=f.metadata.get("help", ""))
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=type(f.default))
        )
    return params


def _zoo_build(
    out: Annotated[Optional[Path], typer.Option("--out", help="Zoo folder (default: the repository's zoo/).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    **values: Any,
) -> None:
    """Train the skill adapters of the default benchmark with PEFT and write them with a manifest."""
    import sys

    from .zoo import ZooConfig, build_zoo, default_zoo_dir

    try:
        config = ZooConfig(**values)
    except ValueError as err:
        _error_exit(err, debug)
    folder = out or default_zoo_dir()
    manifest = build_zoo(config, folder, command=" ".join(["smartfed", *sys.argv[1:]]))
    table = Table(title=f"zoo: {folder}")
    for column in ("adapter", "own skill", *next(iter(manifest["adapters"].values()))["scores"], "MB"):
        table.add_column(column)
    for name, info in manifest["adapters"].items():
        own = info["scores"][info["task"]]
        table.add_row(
            name, f"{own:.3f}", *(f"{v:.3f}" for v in info["scores"].values()), f"{info['bytes'] / 2**20:.1f}"
        )
    Console().print(table)


def _zoo_signature() -> inspect.Signature:
    from .zoo import ZooConfig

    base = [
        p
        for p in inspect.signature(_zoo_build, eval_str=True).parameters.values()
        if p.kind != inspect.Parameter.VAR_KEYWORD
    ]
    return inspect.signature(_zoo_build, eval_str=True).replace(parameters=base + _dataclass_options(ZooConfig))


_zoo_build.__signature__ = _zoo_signature()  # type: ignore[attr-defined]
_demo.__signature__ = _demo_signature()  # type: ignore[attr-defined]
app.command("demo")(_one_line_errors(_demo))
zoo_app.command("build")(_one_line_errors(_zoo_build))


@zoo_app.command("list")
@_one_line_errors
def zoo_list(folder: Annotated[Optional[Path], typer.Argument(help="Zoo folder.")] = None) -> None:
    """The adapters of the zoo with their manifest scores."""
    from .zoo import read_manifest

    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as err:
        _error_exit(err)
    for name, info in manifest["adapters"].items():
        scores = ", ".join(f"{k} {v:.3f}" for k, v in info["scores"].items())
        Console().print(f"zoo:{name}  task={info['task']}  {scores}  ({info['bytes'] / 2**20:.1f} MB)")


@app.command("methods")
def methods_command() -> None:
    """List the registered federated methods."""
    from .methods import list_methods, load_builtin_methods

    load_builtin_methods()
    for name, summary in list_methods().items():
        typer.echo(f"{name:12s} {summary}")


# --- comparing methods: compare, report ---------------------------------------------------------
def _compare(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated registered methods (`smartfed methods`).")],
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per method: --seed, --seed+1, ...")] = 1,
    target: Annotated[
        Optional[float], typer.Option("--target", help="Report the first round whose metric reaches this value.")
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML/YAML/JSON file of the run keys.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    **flags: Any,
) -> None:
    """Run methods × seeds on identical partitions into <output_dir>/<method>/seed<k>/, then write comparison.md."""
    from .benchmark.compare import check_outputs, compare, parse_methods, plan, seed_list
    from .methods import check_sources
    from .run.config import RunConfig

    try:
        values: dict[str, Any] = {"output_dir": "runs/compare"}
        if config is not None:
            values.update(RunConfig.from_file(config))
        values.update({k: v for k, v in flags.items() if v is not None})
        base = RunConfig.from_dict(values, source=str(config or "flags"))
        names = parse_methods(methods)
        seed_values = seed_list(base.seed, seeds)
        check_sources(base)
        _check_paths(base, methods=names)
        check_outputs(plan(base, names, seed_values, base.output_dir))  # no run folder is mixed or overwritten
    except (ValueError, OSError) as err:
        _error_exit(err, debug)
    total = len(names) * len(seed_values)
    done = iter(range(1, total + 1))

    def announce(run_config: RunConfig, reused: bool) -> None:
        state = "finished already, reused" if reused else "running"
        typer.echo(
            f"[{next(done)}/{total}] {run_config.method} seed {run_config.seed}: {state} ({run_config.output_dir})"
        )

    report = compare(base, names, seed_values, base.output_dir, target=target, verbose=verbose, on_run=announce)
    typer.echo(report.read_text(encoding="utf-8"))
    typer.echo(f"wrote {report}")


_compare_own = inspect.signature(_compare, eval_str=True)  # resolved: typer reads the options in Annotated
_compare.__signature__ = _compare_own.replace(  # type: ignore[attr-defined]
    parameters=[p for p in _compare_own.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    + [p for p in _run_options() if p.name != "method"]  # --methods replaces --method
)
app.command("compare")(_one_line_errors(_compare))


@app.command("report")
@_one_line_errors
def report_command(
    dirs: Annotated[list[Path], typer.Argument(help="Run folders, or folders holding run folders (searched).")],
    target: Annotated[
        Optional[float], typer.Option("--target", help="Report the first round whose metric reaches this value.")
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            help="Folder for comparison.md and plots (default: the runs' common folder, when they share a run tree).",
        ),
    ] = None,
    no_plots: Annotated[bool, typer.Option("--no_plots", help="Only the table, no PNG plots.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Rebuild comparison.md (mean ± std over seeds per method) and the plots from finished run folders."""
    from .benchmark.report import default_output, write_report

    try:
        output = output if output is not None else default_output(dirs)
        report = write_report(dirs, output, target=target, plots=not no_plots)
    except (ValueError, OSError) as err:
        _error_exit(err, debug)
    typer.echo(report.read_text(encoding="utf-8"))
    typer.echo(f"wrote {report}")


# --- using a finished run: generate, eval, export ----------------------------------------------
RunDirArg = Annotated[
    Path, typer.Argument(help="Run folder written by `smartfed run` (its --output_dir).", show_default=False)
]
RoundOpt = Annotated[
    Optional[int], typer.Option("--round", min=1, help="Checkpoint round to load (default: the last).")
]
PoolOpt = Annotated[
    Optional[str],
    typer.Option("--pool", help="Comma-separated adapter folders, when they moved since the run (same order)."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _load_run(run_dir: Path, round_: int | None, pool: str | None, debug: bool):
    from transformers.utils import logging as hf_logging

    from .serving.inference import load

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the answer
    try:
        return load(run_dir, checkpoint=round_, pool=pool)
    except (FileNotFoundError, ValueError, TypeError) as err:
        _error_exit(err, debug)


@app.command("generate")
@_one_line_errors
def generate_command(
    run_dir: RunDirArg,
    prompt: Annotated[
        str, typer.Option("--prompt", help="The prompt (the chat template is applied when the tokenizer has one).")
    ],
    max_new_tokens: Annotated[int, typer.Option("--max_new_tokens", min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy; > 0 samples.")] = 0.0,
    round_: RoundOpt = None,
    pool: PoolOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Answer one prompt with a finished run's routed model, streaming tokens to the terminal."""
    import torch
    from transformers import TextStreamer

    from .data.collate import encode_prompt, pad_token_id

    if not prompt.strip():  # checked before the model loads: nothing to answer
        raise ValueError("--prompt is empty: give the text to answer")
    model, tokenizer = _load_run(run_dir, round_, pool, debug)
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError(f"--prompt {prompt[:40]!r} encodes to no tokens with the run's tokenizer")
    input_ids = torch.tensor([ids], dtype=torch.long)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            num_beams=1,
            pad_token_id=pad_token_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
        )


def _task_folder_name(task: str) -> str:
    """``arith`` → arith, ``gsm8k:/data/gsm8k`` → gsm8k, ``mgsm.es:...`` → mgsm.es, ``path/to/file.jsonl`` → file."""
    import re

    from .data import TASKS
    from .data.real import parse_real_spec

    if task in TASKS:
        name = task
    elif parse_real_spec(task) is not None:
        name = task.split(":", 1)[0]
    else:
        name = Path(task).stem
    return re.sub(r"[^\w.-]+", "_", name) or "task"


@app.command("eval")
@_one_line_errors
def eval_command(
    run_dir: RunDirArg,
    task: Annotated[
        Optional[str],
        typer.Option("--task", help="Registered task name or Alpaca-style JSONL file (default: the run's task)."),
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Score only the first N held-out items.")
    ] = None,
    max_new_tokens: Annotated[
        Optional[int], typer.Option("--max_new_tokens", min=1, help="Tokens per answer (default: the run's).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch_size", min=1, help="Prompts per generate call.")] = 16,
    round_: RoundOpt = None,
    pool: PoolOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Score a finished run on the held-out split of a task; writes eval/<task>/ in the run folder."""
    import json

    from .data import load_task
    from .eval import generate_answers
    from .eval.programs import per_example_scores
    from .run.folder import atomic_write_bytes, atomic_write_json

    loaded = _load_run(run_dir, round_, pool, debug)
    config = loaded.config
    task_name = task or config.task
    try:
        spec, _, test = load_task(task_name, seed=config.seed, num_train=config.num_train, num_test=config.num_test)
    except (FileNotFoundError, ValueError) as err:
        _error_exit(err, debug)
    rows = test.select(range(min(limit, len(test)))) if limit else test
    prompts, refs = list(rows["prompt"]), list(rows["answer"])
    new_tokens = max_new_tokens or config.max_new_tokens
    preds = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch_size)
    per_item = per_example_scores(spec.metric, preds, rows)  # record-aware: pass@1 runs the programs
    mean = sum(per_item) / len(per_item) if per_item else 0.0
    out = loaded.run_dir / "eval" / _task_folder_name(task_name)
    lines = [
        json.dumps({"prompt": p, "reference": r, "prediction": y, "score": s}, ensure_ascii=False) + "\n"
        for p, r, y, s in zip(prompts, refs, preds, per_item, strict=True)
    ]
    atomic_write_bytes(out / "predictions.jsonl", "".join(lines).encode())
    atomic_write_json(
        out / "scores.json",
        {
            "task": task_name,
            "metric": spec.metric,
            "score": mean,
            "n": len(per_item),
            "round": loaded.round,
            "max_new_tokens": new_tokens,
            "seed": config.seed,
        },
    )
    typer.echo(f"{task_name}: {spec.metric} {mean:.4f} on {len(per_item)} held-out items (round {loaded.round})")
    typer.echo(f"wrote {out / 'predictions.jsonl'} and {out / 'scores.json'}")


@app.command("export")
@_one_line_errors
def export_command(
    run_dir: RunDirArg,
    output: Annotated[Path, typer.Option("--output", help="Folder to write the adapter to.", show_default=False)],
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank R of the export (truncated SVD per matrix).")],
    to: Annotated[str, typer.Option("--to", help="Export format; 'peft' (a PEFT LoRA adapter).")] = "peft",
    calibration: Annotated[
        int, typer.Option("--calibration", min=1, help="Training examples of the run's task to average the gates over.")
    ] = 64,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Held-out items to score both models on (default: all).")
    ] = None,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option("--max_new_tokens", min=1, help="Tokens per answer when scoring (default: the run's)."),
    ] = None,
    no_eval: Annotated[bool, typer.Option("--no_eval", help="Only write the adapter; do not score it.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output folder.")] = False,
    round_: RoundOpt = None,
    pool: PoolOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Export the routed mixture of a finished run as a static PEFT LoRA adapter of rank R, and score what it costs."""
    from .serving.export import check_output, compare_scores, export_run, write_report

    if to != "peft":
        _error_exit(f"--to {to!r}: the only export format is 'peft'")
    try:  # not into a run folder, the model's folder, or over anything but an earlier export
        check_output(output, overwrite=overwrite, run_dir=run_dir)
    except (FileExistsError, ValueError) as err:
        _error_exit(err, debug)
    loaded = _load_run(run_dir, round_, pool, debug)
    try:
        loaded, report = export_run(
            run_dir, output, rank=rank, calibration=calibration, overwrite=overwrite, loaded=loaded
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        _error_exit(err, debug)
    exact = sum(m.rel_error < 1e-6 for m in report.matrices)
    padded = sum(m.experts < rank for m in report.matrices)
    typer.echo(
        f"wrote a PEFT LoRA adapter (r = lora_alpha = {rank}, {len(report.matrices)} matrices) to {report.output}"
    )
    typer.echo(
        f"gates: mean over {report.info['calibration_examples']} training examples; relative truncation error "
        f"max {report.max_rel_error:.4f}, mean {report.mean_rel_error:.4f}; exact for {exact}/{len(report.matrices)} matrices"
        + (f"; {padded} matrices have fewer than {rank} experts (zero-padded)" if padded else "")
    )
    if no_eval:
        return
    scores = compare_scores(loaded, report.output, limit=limit, max_new_tokens=max_new_tokens)
    table = Table(title=f"held-out {loaded.config.task} ({scores['routed']['metric']})", caption="greedy, same items")
    for column in ("model", "score", "n"):
        table.add_column(column)
    labels = {
        "base": "base model (no adapter)",
        "routed": f"routed MoRE (round {loaded.round})",
        "export": f"static PEFT LoRA r={rank}",
    }
    for key in ("base", "routed", "export"):
        if key in scores:
            table.add_row(labels[key], f"{scores[key]['score']:.4f}", str(int(scores[key]["n"])))
    Console().print(table)
    report.info["scores"] = scores
    write_report(report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
