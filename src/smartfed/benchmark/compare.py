"""``smartfed compare``: run several methods over the same seeds, then write the comparison report.

Every (method, seed) run goes through ``run_simulation``, the code path of
``smartfed run``, into ``<out>/<method>/seed<k>/``. For one seed every method
gets the same data, partitions, client sampling and local batches (they all
derive from ``seed``), so the comparison is paired. A run folder whose
``summary.json`` exists with the same config is reused, and one that holds an
unfinished (or shorter) run of the same settings is resumed, so an interrupted
comparison continues where it stopped. Any other non-empty folder is refused
before the first run starts (a run folder holds one run, never two).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..run.config import RunConfig
from ..run.folder import CONFIG_FILE, SUMMARY_FILE, RunFolder
from .report import write_report


def parse_methods(text: str) -> list[str]:
    """``"fedit, flora"`` → registered method names, in order, each once; unknown names fail."""
    from ..methods import get_method_class, load_builtin_methods

    load_builtin_methods()
    names = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not names:
        raise ValueError(f"--methods {text!r} names no method")
    for name in names:
        get_method_class(name)  # ValueError listing the registered methods
    return names


def seed_list(base_seed: int, seeds: int) -> list[int]:
    """``--seeds N``: N consecutive seeds from ``--seed``."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds {seeds!r} must be a positive integer")
    return [base_seed + i for i in range(seeds)]


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / re.sub(r"[^\w.-]+", "_", method) / f"seed{seed}"


def plan(base: RunConfig, methods: Sequence[str], seeds: Sequence[int], out: str | os.PathLike) -> list[RunConfig]:
    """One config per (method, seed): the base config with only method, seed and output folder changed."""
    root = Path(out)
    return [
        dataclasses.replace(base, method=m, seed=s, output_dir=str(run_dir(root, m, s))) for m in methods for s in seeds
    ]


def is_done(config: RunConfig) -> bool:
    """The run folder holds a finished run of exactly this config."""
    folder = Path(config.output_dir)
    if not (folder / SUMMARY_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        return False
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return {k: v for k, v in saved.items() if k != "output_dir"} == {
        k: v for k, v in config.to_dict().items() if k != "output_dir"
    }


def resumable(config: RunConfig) -> bool:
    """The run folder holds a run that ``config`` may continue (same settings but, e.g., ``num_rounds``)."""
    folder = RunFolder(config.output_dir)
    if not (folder.path / CONFIG_FILE).is_file():
        return False
    try:
        folder.check_resume(config)
    except (ValueError, OSError):
        return False
    return True


def check_outputs(configs: Sequence[RunConfig]) -> None:
    """Refuse, before anything runs, a run folder that is neither reusable, resumable nor empty."""
    for config in configs:
        if not is_done(config) and not resumable(config):
            RunFolder(config.output_dir).check_fresh()


def compare(
    base: RunConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    *,
    target: float | None = None,
    progress: bool = True,
    verbose: bool = False,
    on_run: Callable[[RunConfig, bool], None] | None = None,
) -> Path:
    """Run every (method, seed) not already finished, then write ``comparison.md`` and plots into ``out``.

    ``on_run(config, reused)`` is called before each run (for progress lines).
    """
    from ..errors import RunFailed
    from ..fl.simulation import run_simulation

    configs = plan(base, methods, seeds, out)
    check_outputs(configs)
    for config in configs:
        reused = is_done(config)
        if on_run is not None:
            on_run(config, reused)
        if not reused:
            # a run that trained nothing: its summary.json says why and the report lists it; go on
            with contextlib.suppress(RunFailed):
                run_simulation(config, resume=resumable(config), progress=progress, verbose=verbose)
    return write_report([c.output_dir for c in configs], out, target=target)
