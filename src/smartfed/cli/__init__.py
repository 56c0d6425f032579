"""The ``smartfed`` command line: the typer apps and their commands, in the order ``--help`` lists them.

The commands parse their options, call the package and print what it did:

* ``federation``: ``run``, ``methods``, ``compare``, ``report``;
* ``adapters``: ``demo``, ``pool inspect``, ``zoo build``, ``zoo list``;
* ``finished``: ``generate``, ``eval``, ``export`` (on a finished run);
* ``options``: one option per field of a config dataclass; ``common``: one-line
  errors, the arguments of a finished run.
"""

from __future__ import annotations

import typer

from .adapters import demo_command, pool_inspect, zoo_build, zoo_list
from .common import one_line_errors
from .federation import compare_command, methods_command, report_command, run_command
from .finished import eval_command, export_command, generate_command

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

app.command("run")(one_line_errors(run_command))
app.command("demo")(one_line_errors(demo_command))
app.command("methods")(methods_command)
app.command("compare")(one_line_errors(compare_command))
app.command("report")(one_line_errors(report_command))
app.command("generate")(one_line_errors(generate_command))
app.command("eval")(one_line_errors(eval_command))
app.command("export")(one_line_errors(export_command))
pool_app.command("inspect")(one_line_errors(pool_inspect))
zoo_app.command("build")(one_line_errors(zoo_build))
zoo_app.command("list")(one_line_errors(zoo_list))

__all__ = ["app", "main", "pool_app", "zoo_app"]


def main() -> None:
    """The console entry point ``smartfed``."""
    app()
