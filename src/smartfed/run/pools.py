"""Where ``--lora_pool`` items point: ``zoo:NAME`` names an adapter of the example pool (``smartfed.zoo``).

Resolution sits below the methods and the Flower apps (a run folder checks its pool, a client loads
it); building the pool is an application (``smartfed zoo build``) and lives in ``smartfed.zoo``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ZOO_PREFIX = "zoo:"


def default_zoo_dir() -> Path:
    """``$SMARTFED_ZOO``, else the ``zoo/smollm2-135m`` folder of this source checkout."""
    if os.environ.get("SMARTFED_ZOO"):
        return Path(os.environ["SMARTFED_ZOO"]).expanduser()
    return Path(__file__).resolve().parents[3] / "zoo" / "smollm2-135m"


def read_manifest(zoo_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    folder = Path(zoo_dir).expanduser() if zoo_dir else default_zoo_dir()
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"zoo manifest {path} does not exist; build it with `smartfed zoo build --out {folder}`"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"zoo manifest {path} is not valid JSON ({err})") from err


def resolve_pool(sources: str, zoo_dir: str | os.PathLike[str] | None = None) -> str:
    """Replace ``zoo:NAME`` items of a ``--lora_pool`` list by adapter folders (``zoo:`` alone: all of them)."""
    items = [s.strip() for s in sources.split(",") if s.strip()]
    if not any(item.startswith(ZOO_PREFIX) for item in items):
        return sources
    folder = Path(zoo_dir).expanduser() if zoo_dir else default_zoo_dir()
    known = sorted(read_manifest(folder)["adapters"])
    resolved = []
    for item in items:
        if not item.startswith(ZOO_PREFIX):
            resolved.append(item)
            continue
        name = item.removeprefix(ZOO_PREFIX)
        names = known if not name else [name]
        for adapter in names:
            if adapter not in known:
                raise ValueError(f"--lora_pool: {item!r} is not in the zoo at {folder}; it holds {known}")
            resolved.append(str(folder / adapter))
    return ",".join(resolved)
