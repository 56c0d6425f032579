"""Command-line options from a config dataclass: one ``--field`` per field, with the field's help.

A command that takes ``**values`` gets, through ``add_dataclass_options``, a
signature (which typer reads) with its own parameters followed by one
keyword-only option per field of the dataclass, spelled ``--field_name`` as in
the paper's reference CLI (``--num_rounds``). The help is the field's
``metadata["help"]``.

Two kinds of default:

* ``overrides=False``: the option's default is the field's default (``zoo
  build``, ``demo``: the dataclass is built from the options alone).
* ``overrides=True``: every option defaults to None, unshown, and a bool
  field is a ``--field/--no_field`` pair; the command passes on only the
  options given, which override a ``--config`` file (``run``, ``compare``).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Collection
from dataclasses import Field, fields, is_dataclass
from typing import Any, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

import typer

Command = TypeVar("Command", bound=Callable[..., Any])


def dataclass_options(
    cls: type,
    *,
    overrides: bool = False,
    exclude: Collection[str] = (),
    prefix: str = "",
    show_field_defaults: bool = False,
) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of the dataclass ``cls`` (module docstring), but those in ``exclude``.

    ``prefix`` goes before each option's and parameter's name (``--distill_steps`` for ``steps``);
    ``show_field_defaults`` shows the field's default in the help of an ``overrides`` option.
    """
    if not is_dataclass(cls):
        raise TypeError(f"dataclass_options: {cls!r} is not a dataclass")
    params = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in exclude:
            continue
        kind = _option_kind(f, hints.get(f.name))
        name = prefix + f.name
        if overrides:
            names = [f"--{name}/--no_{name}"] if kind is bool else [f"--{name}"]
            text = f.metadata.get("help", "") + (f" (default: {f.default})" if show_field_defaults else "")
            option = typer.Option(None, *names, help=text, show_default=False)
            annotation: Any = Optional[kind]  # a runtime type: typer reads it
        else:
            option = typer.Option(f.default, f"--{name}", help=f.metadata.get("help", ""))
            annotation = kind if f.default is not None else Optional[kind]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def _option_kind(f: Field, hint: Any) -> type:
    """The option's value type: the default's (int, float, bool, else str), or for a ``None`` default
    the ``X`` of the field's ``X | None`` annotation."""
    if f.default is None and get_origin(hint) in (Union, types.UnionType):
        inner = [t for t in get_args(hint) if t is not type(None)]
        if len(inner) == 1 and inner[0] in (int, float, bool, str):
            return inner[0]
    return {int: int, float: float, bool: bool}.get(type(f.default), str)


def add_dataclass_options(
    command: Command,
    cls: type,
    *,
    overrides: bool = False,
    exclude: Collection[str] = (),
    prefix: str = "",
    show_field_defaults: bool = False,
) -> Command:
    """Replace the ``**values`` of ``command``'s signature by ``dataclass_options(cls, ...)``; returns ``command``.

    Call it before wrapping the command (``functools.wraps`` copies the signature).
    """
    own = inspect.signature(command, eval_str=True)  # resolved: typer reads the options in Annotated
    base = [p for p in own.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    if len(base) == len(own.parameters):
        raise TypeError(f"add_dataclass_options: {command.__name__} takes no **values to hold the options")
    options = dataclass_options(
        cls, overrides=overrides, exclude=exclude, prefix=prefix, show_field_defaults=show_field_defaults
    )
    command.__signature__ = own.replace(parameters=base + options)  # type: ignore[attr-defined]
    return command
