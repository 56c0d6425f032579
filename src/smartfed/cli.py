"""The ``smartfed`` command line."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="SmartFed: federated routing of rank-one experts from existing LoRA adapters.",
    no_args_is_help=True,
    add_completion=False,
)
pool_app = typer.Typer(help="Inspect LoRA pools.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")


@app.command()
def demo(seed: Annotated[int, typer.Option(help="Random seed of the demo.")] = 0) -> None:
    """Route the rank-one experts of two tiny skill adapters to solve a task neither solves alone."""
    from .demo import run_demo

    run_demo(Console(), seed=seed)


@pool_app.command("inspect")
def pool_inspect(
    sources: Annotated[list[str], typer.Argument(help="PEFT adapter folders or Hub ids.")],
) -> None:
    """Show the adapters of a pool and the experts it gives each target matrix."""
    from .more import LoraPool

    console = Console()
    try:
        pool = LoraPool.load(sources)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from None
    table = Table(title=repr(pool))
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


def _fail(message: str, debug: bool = False) -> NoReturn:
    """One clear line on stderr and exit code 2 (a usage or input error)."""
    Console(stderr=True).print(f"[red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(2)


def _run_options() -> list[inspect.Parameter]:
    """One CLI option per RunConfig field, spelled as in the paper's reference CLI (--num_rounds)."""
    from .fl.run_config import RunConfig

    params = []
    for f in fields(RunConfig):
        kind = {int: int, float: float, bool: bool}.get(type(f.default), str)
        names = [f"--{f.name}"]
        if kind is bool:
            names = [f"--{f.name}/--no_{f.name}"]
        option = typer.Option(None, *names, help=f.metadata.get("help", ""), show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))  # noqa: UP045 (typer needs Optional)
    return params


def _run(
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML/YAML/JSON file of the same keys.")] = None,  # noqa: UP045
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder.")] = None,  # noqa: UP045
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    **flags: Any,
) -> None:
    """Run a federation on Flower's simulation engine; writes a run folder under --output_dir."""
    from .fl.run_config import RunConfig
    from .fl.run_folder import RunFolder
    from .fl.simulation import run_simulation

    try:
        values: dict[str, Any] = {}
        if resume is not None:
            values.update(RunFolder(resume).read_config())
            values["output_dir"] = str(resume)
        if config is not None:
            values.update(RunConfig.from_file(config))
        values.update({k: v for k, v in flags.items() if v is not None})
        run_config = RunConfig.from_dict(values, source=str(config or "flags"))
        run_config.require_sources()
        _check_paths(run_config)
    except (ValueError, FileNotFoundError) as err:
        if debug:
            raise
        _fail(str(err))
    run_simulation(run_config, resume=resume is not None, verbose=verbose)
    summary = Path(run_config.output_dir) / "summary.json"
    Console().print(f"run folder: {run_config.output_dir}  (summary: {summary})")


def _check_paths(config) -> None:
    """Fail before starting Flower when a local path the run needs is missing."""
    from .more import LoraPool

    LoraPool.load(config.lora_pool)  # names the missing or broken adapter
    model = Path(config.model_name_or_path).expanduser()
    if config.model_name_or_path.startswith((".", "/", "~")) and not model.exists():
        raise FileNotFoundError(f"--model_name_or_path {config.model_name_or_path}: no such folder")


_run.__signature__ = inspect.signature(_run).replace(  # type: ignore[attr-defined]
    parameters=[p for p in inspect.signature(_run).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    + _run_options()
)
app.command("run")(_run)


@app.command("methods")
def methods_command() -> None:
    """List the registered federated methods."""
    from .methods import list_methods, load_builtin_methods

    load_builtin_methods()
    for name, summary in list_methods().items():
        typer.echo(f"{name:12s} {summary}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
