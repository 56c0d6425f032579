"""What the commands share: one-line errors, and the arguments and loading of a finished run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from ..errors import ANTICIPATED, one_line


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """An anticipated error raised anywhere in ``command`` (inside Flower's ServerApp too): ``error: …``, exit 2.

    ``--debug`` (the command's ``debug`` argument) re-raises it with its traceback.
    """

    @functools.wraps(command)  # keeps the signature (and a set __signature__) typer reads the options from
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ANTICIPATED as err:
            error_exit(err, bool(kwargs.get("debug", False)))

    return wrapper


def error_exit(err: BaseException | str, debug: bool = False) -> NoReturn:
    """``error: <message>`` on one unwrapped stderr line, exit code 2."""
    if debug and isinstance(err, BaseException):
        raise err
    message = one_line(err) if isinstance(err, BaseException) else " ".join(err.split())
    typer.echo(typer.style("error:", fg="red") + " " + message, err=True)
    raise typer.Exit(2)


# --- the arguments of the commands on a finished run: generate, eval, export --------------------
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
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where the model loads: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        help="dtype of the base: 'auto', 'float32', 'bfloat16', 'float16' (default: the run's --dtype).",
        show_default=False,
    ),
]
Load4Opt = Annotated[
    Optional[bool],
    typer.Option(
        "--load_in_4bit/--no_load_in_4bit",
        help="Quantise the base to 4-bit with bitsandbytes (default: as the run did).",
        show_default=False,
    ),
]
Load8Opt = Annotated[
    Optional[bool],
    typer.Option(
        "--load_in_8bit/--no_load_in_8bit",
        help="Quantise the base to 8-bit with bitsandbytes (default: as the run did).",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class Placement:
    """Where and in what a finished run's model loads: ``--device``, ``--dtype``, ``--load_in_4bit/8bit``."""

    device: str = "auto"
    dtype: str | None = None  # None: the run's own setting
    load_in_4bit: bool | None = None
    load_in_8bit: bool | None = None


def load_run(
    run_dir: Path, round_: int | None, pool: str | None, debug: bool, placement: Placement | None = None
) -> Any:
    """``smartfed.load`` of a finished run without progress bars; a bad folder is one ``error:`` line."""
    from transformers.utils import logging as hf_logging

    from ..serving.inference import load

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the answer
    where = placement or Placement()
    try:
        return load(
            run_dir,
            checkpoint=round_,
            pool=pool,
            device=where.device,
            dtype=where.dtype,
            load_in_4bit=where.load_in_4bit,
            load_in_8bit=where.load_in_8bit,
        )
    except (FileNotFoundError, ValueError, TypeError) as err:
        error_exit(err, debug)
