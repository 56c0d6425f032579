"""The paper's five claims (Wu et al., 2025), measured from run folders, each with a 95 % interval and a verdict.

Layout read: ``<root>/<composite>/<system>/seed<k>/`` (what ``smartfed compare`` writes,
plus SmartFed variants in their own ``<system>`` folders). Every evaluated round of
a run keeps its per-item held-out scores (``eval_items`` in metrics.jsonl), so every
figure here can be recomputed on resampled items.

Intervals resample held-out *items*, clustered: one draw picks item indices once and
every system and seed is re-scored on those same items (the items are shared; the
seeds are not independent samples of them). Costs to reach FedIT's final score:

- per seed s, the target is FedIT's final score of seed s; a system's cost is what it
  spent (bytes up + down, training seconds, training kWh, rounds) up to and including
  the first evaluated round whose score reaches the target; FedIT's own cost is up to
  the first round where it reached its final score;
- the ratio is FedIT's cost summed over seeds over the system's, summed over seeds (a
  seed where the system never reaches the target makes the ratio 0: it did not get there).

Verdicts, against the paper's figure F (a ratio or a gain):
- "holds": significant in the paper's direction (the interval excludes no effect) and
  the interval reaches F;
- "partly": significant in the paper's direction, but the whole interval falls short of F;
- "does not hold": not significant, or the other way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .report import load_run

DRAWS = 2000
COSTS = ("rounds", "train_seconds", "bytes", "train_kwh")
PAPER = {  # the SmartFed paper's figures (Wu et al., 2025)
    "accuracy": 0.1021,
    "rounds": 3.95,
    "bytes": 31.47,
    "train_kwh": 3.61,
}


@dataclass
class Run:
    """One run folder, as the claims read it."""

    seed: int
    rounds: list[int]  # evaluated rounds, ascending
    items: np.ndarray  # (evaluated rounds, held-out items) per-item scores
    cumulative: dict[str, np.ndarray]  # cost -> (evaluated rounds,) spent up to and including each

    @classmethod
    def load(cls, path: Path) -> Run:
        record = load_run(path)
        rows = sorted(record.rows, key=lambda r: int(r["round"]))
        spent = {"rounds": 0.0, "train_seconds": 0.0, "bytes": 0.0, "train_kwh": 0.0}
        rounds, items, cumulative = [], [], {k: [] for k in COSTS}
        for row in rows:
            spent["rounds"] += 1
            spent["train_seconds"] += float(row.get("train_seconds") or 0.0)
            spent["bytes"] += float(row.get("bytes_up") or 0) + float(row.get("bytes_down") or 0)
            kwh = row.get("train_kwh")
            spent["train_kwh"] = math.nan if kwh is None else spent["train_kwh"] + float(kwh)
            if row.get("eval_items") is None:
                continue
            rounds.append(int(row["round"]))
            items.append(row["eval_items"])
            for key in COSTS:
                cumulative[key].append(spent[key])
        if not items:
            raise ValueError(f"{path}: no evaluated round with per-item scores (eval_items) in metrics.jsonl")
        if len({len(i) for i in items}) != 1:
            raise ValueError(f"{path}: evaluated rounds scored different numbers of items")
        return cls(
            seed=int(record.config.get("seed", 0)),
            rounds=rounds,
            items=np.asarray(items, dtype=np.float64),
            cumulative={k: np.asarray(v, dtype=np.float64) for k, v in cumulative.items()},
        )


def load_systems(folder: Path) -> dict[str, dict[int, Run]]:
    """``<folder>/<system>/seed<k>/`` → {system: {seed: Run}}."""
    systems: dict[str, dict[int, Run]] = {}
    for seed_dir in sorted(folder.glob("*/seed*")):
        if not re.fullmatch(r"seed\d+", seed_dir.name) or not (seed_dir / "summary.json").is_file():
            continue
        run = Run.load(seed_dir)
        systems.setdefault(seed_dir.parent.name, {})[run.seed] = run
    if not systems:
        raise FileNotFoundError(f"{folder}: no finished run folder <system>/seed<k>/")
    return systems


# --------------------------------------------------------------------------- statistics


def _first_reach(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Index of the first evaluated round with score ≥ target, per column; -1 where none.

    scores: (rounds, draws), target: (draws,).
    """
    reached = scores >= target[None, :] - 1e-12
    first = reached.argmax(axis=0)
    return np.where(reached.any(axis=0), first, -1)


def _cost_ratio(fedit: dict[int, Run], system: dict[int, Run], cost: str, idx: np.ndarray) -> np.ndarray:
    """FedIT's cost to its final score over the system's cost to reach it, per draw of items ``idx`` (draws, N)."""
    num = np.zeros(len(idx))
    den = np.zeros(len(idx))
    for seed, base in fedit.items():
        run = system[seed]
        base_scores = base.items[:, idx].mean(axis=2)  # (rounds, draws)
        target = base_scores[-1]
        own = _first_reach(base_scores, target)  # always found: the last round reaches itself
        num += base.cumulative[cost][own]
        first = _first_reach(run.items[:, idx].mean(axis=2), target)
        den += np.where(first >= 0, run.cumulative[cost][np.maximum(first, 0)], np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isinf(den), 0.0, num / den)


def _final(runs: dict[int, Run], idx: np.ndarray) -> np.ndarray:
    """Mean over seeds of the final score, per draw of items (draws,)."""
    return np.mean([run.items[-1, idx].mean(axis=1) for run in runs.values()], axis=0)


def bootstrap(stat: Callable[[np.ndarray], np.ndarray], n_items: int, *, seed: int = 0) -> tuple[float, float, float]:
    """(point, 2.5 %, 97.5 %) of ``stat`` over items resampled with replacement (clustered by item)."""
    rng = np.random.default_rng(seed)
    point = float(stat(np.arange(n_items)[None, :])[0])
    draws = stat(rng.integers(0, n_items, size=(DRAWS, n_items)))
    low, high = np.quantile(draws, [0.025, 0.975])
    return point, float(low), float(high)


def verdict(low: float, high: float, *, null: float, paper: float | None) -> str:
    """See the module docstring; ``null``: the value of no effect (1 for a ratio, 0 for a gain)."""
    if not low > null:
        return "does not hold"
    if paper is None or high >= paper:
        return "holds"
    return "partly"


# --------------------------------------------------------------------------- claims


def _items(systems: dict[str, dict[int, Run]]) -> int:
    sizes = {run.items.shape[1] for runs in systems.values() for run in runs.values()}
    if len(sizes) != 1:
        raise ValueError(f"systems were scored on different numbers of held-out items: {sorted(sizes)}")
    return sizes.pop()


def _paired(systems: dict[str, dict[int, Run]], names: Sequence[str]) -> None:
    seeds = [set(systems[n]) for n in names]
    if any(s != seeds[0] for s in seeds):
        raise ValueError(f"systems {list(names)} do not share their seeds: {[sorted(s) for s in seeds]}")


def composite_claims(systems: dict[str, dict[int, Run]], *, smartfed: str = "smartfed") -> list[dict[str, Any]]:
    """Every claim that the runs of one composite can answer, as table rows."""
    for name in (smartfed, "fedit"):
        if name not in systems:
            raise ValueError(f"the claims need a {name!r} system; found {sorted(systems)}")
    n = _items(systems)
    rows: list[dict[str, Any]] = []
    baselines = [s for s in systems if s != smartfed and not s.startswith(smartfed + "_")]
    _paired(systems, [smartfed, *baselines])
    best = max(baselines, key=lambda s: float(_final(systems[s], np.arange(n)[None, :])[0]))

    def gain(idx: np.ndarray) -> np.ndarray:
        base = _final(systems[best], idx)
        return (_final(systems[smartfed], idx) - base) / np.maximum(base, 1e-12)

    point, low, high = bootstrap(gain, n)
    rows.append(_row("accuracy", f"SmartFed vs the best of {len(baselines)} baselines ({best})", point, low, high, 0.0))
    for cost in ("rounds", "train_seconds", "bytes", "train_kwh"):
        if cost == "train_kwh" and any(
            np.isnan(run.cumulative[cost]).any() for s in (smartfed, "fedit") for run in systems[s].values()
        ):
            rows.append({"claim": cost, "measured": "no energy estimate in these runs", "verdict": "not measured"})
            continue
        point, low, high = bootstrap(lambda idx, c=cost: _cost_ratio(systems["fedit"], systems[smartfed], c, idx), n)
        rows.append(_row(cost, f"FedIT's {cost} to its final score / SmartFed's", point, low, high, 1.0))
    for variant, other, claim, what in (
        (f"{smartfed}_data10", "fedit", "data10", "SmartFed on 10 % of the data − FedIT on all of it"),
        (f"{smartfed}_half_eeqa", f"{smartfed}_half_uniform", "eeqa", "at half the expert budget: EEQA − uniform"),
    ):
        if variant in systems and other in systems:
            _paired(systems, [variant, other])
            point, low, high = bootstrap(
                lambda idx, a=variant, b=other: _final(systems[a], idx) - _final(systems[b], idx), n
            )
            rows.append(_row(claim, what, point, low, high, 0.0))
    return rows


def _row(claim: str, what: str, point: float, low: float, high: float, null: float) -> dict[str, Any]:
    paper = PAPER.get(claim)
    if claim == "train_seconds":
        paper = PAPER["rounds"]  # the paper's convergence factor, read in time as well as rounds
    return {
        "claim": claim,
        "measured": what,
        "paper": paper,
        "point": point,
        "low": low,
        "high": high,
        "verdict": verdict(low, high, null=null, paper=paper),
    }


# --------------------------------------------------------------------------- output

_PAPER_TEXT = {
    "accuracy": "+10.21 % accuracy over the best baseline",
    "rounds": "3.95× faster convergence (rounds)",
    "train_seconds": "3.95× faster convergence (training seconds)",
    "bytes": "31.47× less communication (up + down)",
    "train_kwh": "3.61× less energy (training; an estimate here)",
    "data10": "10 % of the data beats FedIT",
    "eeqa": "EEQA beats uniform quotas at half the budget (Fig. 5)",
}


def _fmt(claim: str, value: float) -> str:
    if claim == "accuracy":
        return f"{100 * value:+.1f} %"
    if claim in ("data10", "eeqa"):
        return f"{value:+.3f}"
    return "never reached" if value == 0 else f"{value:.2f}×"


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| composite | claim (paper) | measured as | ours [95 % interval] | verdict |",
        "|---|---|---|---|---|",
    ]
    for composite, rows in results.items():
        for r in rows:
            if "point" not in r:
                lines.append(f"| {composite} | {_PAPER_TEXT[r['claim']]} | {r['measured']} | – | {r['verdict']} |")
                continue
            ours = f"{_fmt(r['claim'], r['point'])} [{_fmt(r['claim'], r['low'])}, {_fmt(r['claim'], r['high'])}]"
            lines.append(f"| {composite} | {_PAPER_TEXT[r['claim']]} | {r['measured']} | {ours} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m smartfed.benchmark.claims RUNS_ROOT --output DIR``: table.md and claims.json from ``RUNS_ROOT/<composite>/``."""
    import argparse

    from ..run.folder import atomic_write_bytes, atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m smartfed.benchmark.claims", description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    composites = sorted(p for p in args.root.iterdir() if p.is_dir())
    results = {c.name: composite_claims(load_systems(c)) for c in composites}
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output / "claims.json", results)
    atomic_write_bytes(args.output / "table.md", render(results).encode())
    print(render(results))


if __name__ == "__main__":
    main()
