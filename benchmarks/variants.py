"""Systems side by side from their run folders: scores per seed, a paired difference with an item bootstrap, bytes.

    python benchmarks/variants.py LABEL=FOLDER [LABEL=FOLDER ...] --reference LABEL [--output table.md]

Each FOLDER holds ``seed<k>/`` run folders (``smartfed compare`` and results/claims/regenerate.sh write
``<out>/<system>/seed<k>/``). For every system: the final held-out score per seed, mean ± sample std over
seeds, the paired difference to the reference over the seeds both ran (the items are shared, so one
bootstrap draw of items re-scores both systems on every seed: ``smartfed.benchmark.claims.bootstrap``), and what
one client sends and receives per round (up + down, mean over rounds). Used for the router study and
the wire dtype (results/claims, results/wire_dtype); seconds are not compared here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from smartfed.benchmark.claims import Run, bootstrap
from smartfed.benchmark.report import load_run


def load_system(folder: Path) -> dict[int, Run]:
    """{seed: Run} of the finished runs ``folder/seed<k>/``."""
    runs = {}
    for seed_dir in sorted(folder.glob("seed*")):
        if (seed_dir / "summary.json").is_file():
            run = Run.load(seed_dir)
            runs[run.seed] = run
    if not runs:
        raise SystemExit(f"{folder}: no finished run folder seed<k>/ (summary.json)")
    return runs


def bytes_per_client_round(folder: Path) -> float:
    """Mean over the runs' rounds of what one client sends plus receives."""
    per_round = []
    for seed_dir in sorted(folder.glob("seed*")):
        if (seed_dir / "summary.json").is_file():
            for row in load_run(seed_dir).rows:
                per_round.append(
                    float(row.get("bytes_up_per_client") or 0) + float(row.get("bytes_down_per_client") or 0)
                )
    return float(np.mean(per_round)) if per_round else float("nan")


def paired_difference(system: dict[int, Run], reference: dict[int, Run]) -> tuple[float, float, float, list[int]]:
    """(point, 2.5 %, 97.5 %) of mean final score(system) − mean final score(reference) over their shared seeds."""
    seeds = sorted(set(system) & set(reference))
    if not seeds:
        return float("nan"), float("nan"), float("nan"), []
    n = system[seeds[0]].items.shape[1]

    def diff(idx: np.ndarray) -> np.ndarray:  # idx (draws, n): the same items for both systems and every seed
        own = np.mean([system[s].items[-1, idx].mean(axis=1) for s in seeds], axis=0)
        ref = np.mean([reference[s].items[-1, idx].mean(axis=1) for s in seeds], axis=0)
        return own - ref

    point, low, high = bootstrap(diff, n)
    return point, low, high, seeds


def table(systems: dict[str, Path], reference: str) -> str:
    runs = {label: load_system(folder) for label, folder in systems.items()}
    sizes = {run.items.shape[1] for by_seed in runs.values() for run in by_seed.values()}
    if len(sizes) != 1:
        raise SystemExit(f"the systems were scored on different numbers of held-out items: {sorted(sizes)}")
    lines = [
        f"| system | seeds | final score (mean ± std) | per seed | − {reference}, paired [95 % item bootstrap] "
        "| up + down per client per round |",
        "|---|---|---|---|---|---|",
    ]
    for label, by_seed in runs.items():
        finals = [float(by_seed[s].items[-1].mean()) for s in sorted(by_seed)]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        point, low, high, shared = paired_difference(by_seed, runs[reference])
        paired = "" if label == reference else f"{point:+.3f} [{low:+.3f}, {high:+.3f}] (seeds {shared})"
        mb = bytes_per_client_round(systems[label]) / 1e6
        lines.append(
            f"| {label} | {len(finals)} | {np.mean(finals):.3f} ± {std:.3f} | "
            f"{', '.join(f'{f:.3f}' for f in finals)} | {paired} | {mb:.3g} MB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("systems", nargs="+", metavar="LABEL=FOLDER")
    parser.add_argument("--reference", required=True, help="the LABEL the paired differences are taken against")
    parser.add_argument("--output", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    systems = {}
    for spec in args.systems:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            parser.error(f"expected LABEL=FOLDER, got {spec!r}")
        systems[label] = Path(folder)
    if args.reference not in systems:
        parser.error(f"--reference {args.reference!r} is not one of the labels {sorted(systems)}")
    text = table(systems, args.reference)
    if args.output:
        from smartfed.run.folder import atomic_write_bytes

        atomic_write_bytes(args.output, text.encode())
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
