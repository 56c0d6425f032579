"""The ``smartfed`` command line."""

from __future__ import annotations

from typing import Annotated

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
