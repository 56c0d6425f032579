"""LoRA pools and the example zoo: ``pool inspect``, ``zoo build``, ``zoo list``, ``demo``.

``zoo build`` and ``demo`` take one option per field of their config dataclass
(``ZooConfig``, ``CompositionConfig``; ``cli.options``), defaulting to the field's
default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..benchmark.runner import CompositionConfig
from ..zoo import ZooConfig
from .common import error_exit
from .options import add_dataclass_options


def demo_command(
    tiny: Annotated[bool, typer.Option("--tiny", help="The 20-second tiny-model demo instead.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --tiny demo.")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    **values: Any,
) -> None:
    """Compose two skill adapters of the example zoo on SmolLM2-135M with SmartFed, against the baselines."""
    if tiny:
        from ..demo import run_demo

        run_demo(Console(), seed=seed)
        return
    from ..benchmark.runner import run_composition

    try:
        config = CompositionConfig(**values)
    except ValueError as err:
        error_exit(err, debug)
    try:
        run_composition(config, Console())
    except (FileNotFoundError, ValueError) as err:
        error_exit(err, debug)


add_dataclass_options(demo_command, CompositionConfig)


def pool_inspect(
    sources: Annotated[list[str], typer.Argument(help="PEFT adapter folders or Hub ids.")],
) -> None:
    """Show the adapters of a pool and the experts it gives each target matrix."""
    from ..more import LoraPool

    console = Console()
    try:
        pool = LoraPool.load(sources)
    except (FileNotFoundError, ValueError) as err:
        error_exit(err)
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


def zoo_build(
    out: Annotated[Optional[Path], typer.Option("--out", help="Zoo folder (default: the repository's zoo/).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    **values: Any,
) -> None:
    """Train the skill adapters of the default benchmark with PEFT and write them with a manifest."""
    import sys

    from ..zoo import build_zoo, default_zoo_dir

    try:
        config = ZooConfig(**values)
    except ValueError as err:
        error_exit(err, debug)
    folder = out or default_zoo_dir()
    manifest = build_zoo(config, folder, command=" ".join(["smartfed", *sys.argv[1:]]))
    Console().print(_zoo_table(manifest, title=f"zoo: {folder}"))


def _zoo_table(manifest: dict[str, Any], *, title: str) -> Table:
    """Each adapter's own-skill score and its scores on the compositions, and the base's; '–' where not scored.

    Adapters built at different times may have been scored on different
    compositions (one added later), so the columns are the union of them all.
    """
    adapters = manifest["adapters"]
    own_tasks = {info["task"] for info in adapters.values()}
    columns = list(dict.fromkeys(t for info in adapters.values() for t in info["scores"] if t not in own_tasks))
    table = Table(title=title)
    for column in ("adapter", "own skill", *columns, "MB"):
        table.add_column(column)

    def cell(scores: dict[str, float], task: str) -> str:
        return f"{scores[task]:.3f}" if task in scores else "–"

    for name, info in adapters.items():
        own = f"{info['task']} {info['scores'][info['task']]:.3f}"
        table.add_row(name, own, *(cell(info["scores"], t) for t in columns), f"{info['bytes'] / 2**20:.1f}")
    base = manifest.get("base_scores", {})
    if base:
        own = ", ".join(f"{t} {v:.3f}" for t, v in base.items() if t in own_tasks)
        table.add_row("base", own, *(cell(base, t) for t in columns), "")
    return table


add_dataclass_options(zoo_build, ZooConfig)


def zoo_list(folder: Annotated[Optional[Path], typer.Argument(help="Zoo folder.")] = None) -> None:
    """The adapters of the zoo with their manifest scores."""
    from ..zoo import read_manifest

    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as err:
        error_exit(err)
    for name, info in manifest["adapters"].items():
        scores = ", ".join(f"{k} {v:.3f}" for k, v in info["scores"].items())
        Console().print(f"zoo:{name}  task={info['task']}  {scores}  ({info['bytes'] / 2**20:.1f} MB)")
