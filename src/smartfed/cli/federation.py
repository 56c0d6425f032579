"""Running federations: ``run``, ``compare``, ``report``, ``methods``.

``run`` and ``compare`` take one option per ``RunConfig`` field (``cli.options``,
``overrides=True``): the options given override ``--config``, and a resumed
run's own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ..run.config import RunConfig
from .common import error_exit
from .options import add_dataclass_options


def run_command(
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

    from ..fl.simulation import run_simulation
    from ..methods import check_sources
    from ..run.folder import RunFolder

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
        pool = check_paths(run_config)
        folder = RunFolder(run_config.output_dir)  # refused here, with nothing written, or locked
        stack.enter_context(folder.open_run(run_config, resume=resume is not None, overwrite=overwrite, pool=pool))
    except (ValueError, OSError) as err:
        stack.close()
        error_exit(err, debug)
    with stack:
        run_simulation(run_config, resume=resume is not None, verbose=verbose)
    summary = Path(run_config.output_dir) / "summary.json"
    Console().print(f"run folder: {run_config.output_dir}  (summary: {summary})")


add_dataclass_options(run_command, RunConfig, overrides=True)


def check_paths(config: RunConfig, methods: Optional[list[str]] = None) -> Any:
    """Fail before starting Flower when a local path the run needs is missing, or the method cannot use it.

    ``methods``: the methods that will run over the pool (default: ``config.method``); each parses
    its ``--method_options`` and checks the pool (e.g. SmartFed's ``--topk_experts``) here.
    Returns the loaded pool (or None).
    """
    from dataclasses import replace

    from ..data import load_task
    from ..methods import get_method_class, load_builtin_methods
    from ..more import LoraPool
    from ..run.pools import resolve_pool

    check_hardware(config)
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
        from ..models import resolve_model

        resolve_model(str(model))  # a GGUF that is not a model fails here (a real one is converted once, cached)
    load_task(config.task, seed=config.seed, num_train=config.num_train, num_test=config.num_test)  # bad data files
    for runner in runners if pool is not None else []:  # last: the paths' own errors come first
        runner.check_pool(pool)
    return pool


def check_hardware(config: RunConfig) -> None:
    """Fail before starting Flower when this machine lacks what ``--device``, ``--load_in_4bit/8bit`` or
    ``--client_gpus`` ask for (no CUDA, no bitsandbytes)."""
    from ..fl.simulation import check_gpus
    from ..models import check_quantisation, resolve_device

    resolve_device(config.device)
    check_quantisation(config.load_in_4bit, config.load_in_8bit)
    check_gpus(config)


def methods_command() -> None:
    """List the registered federated methods."""
    from ..methods import list_methods, load_builtin_methods

    load_builtin_methods()
    for name, summary in list_methods().items():
        typer.echo(f"{name:12s} {summary}")


# --- comparing methods: compare, report ---------------------------------------------------------
def compare_command(
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
    from ..benchmark.compare import check_outputs, compare, parse_methods, plan, seed_list
    from ..methods import check_sources

    try:
        values: dict[str, Any] = {"output_dir": "runs/compare"}
        if config is not None:
            values.update(RunConfig.from_file(config))
        values.update({k: v for k, v in flags.items() if v is not None})
        base = RunConfig.from_dict(values, source=str(config or "flags"))
        names = parse_methods(methods)
        seed_values = seed_list(base.seed, seeds)
        check_sources(base)
        check_paths(base, methods=names)
        check_outputs(plan(base, names, seed_values, base.output_dir))  # no run folder is mixed or overwritten
    except (ValueError, OSError) as err:
        error_exit(err, debug)
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


add_dataclass_options(compare_command, RunConfig, overrides=True, exclude=("method",))  # --methods replaces --method


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
    from ..benchmark.report import default_output, write_report

    try:
        output = output if output is not None else default_output(dirs)
        report = write_report(dirs, output, target=target, plots=not no_plots)
    except (ValueError, OSError) as err:
        error_exit(err, debug)
    typer.echo(report.read_text(encoding="utf-8"))
    typer.echo(f"wrote {report}")
