"""The benchmark's results: statistics (Wilson intervals, paired bootstrap), ``results.json``, the
summary over seeds, ``table.md``, the console table and ``metric_vs_round.png`` (``runner`` runs the
systems; this module only reads what they scored)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (good near 0 and 1, where most baselines sit)."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, seed: int = 0, draws: int = 2000
) -> tuple[float, float, float]:
    """Mean of a − b over the same items and its 95% bootstrap interval (items resampled)."""
    diffs = torch.tensor([x - y for x, y in zip(a, b, strict=True)], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diffs), (draws, len(diffs)), generator=generator)
    means = diffs[idx].mean(dim=1)
    return float(diffs.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def write_results(out: Path, results: dict[str, Any]) -> None:
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")


def system_items(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    """System → one per-item vector per seed (static systems repeat theirs)."""
    seeds = list(results["seeds"])
    systems = {label: [items] * len(seeds) for label, items in results["items"].items()}
    for seed in seeds:
        for label, entry in results["seeds"][seed].items():
            systems.setdefault(label, []).append(entry["items"])
    return systems


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Mean over seeds, std, the Wilson interval of the pooled items, and SmartFed − system paired differences."""
    systems = system_items(results)
    summary: dict[str, Any] = {}
    smartfed = [x for v in systems.get("smartfed", []) for x in v]
    for label, vectors in systems.items():
        per_seed = [sum(v) / len(v) for v in vectors]
        mean = sum(per_seed) / len(per_seed)
        std = (sum((s - mean) ** 2 for s in per_seed) / (len(per_seed) - 1)) ** 0.5 if len(per_seed) > 1 else 0.0
        pooled = [x for v in vectors for x in v]
        low, high = wilson_interval(sum(pooled), len(pooled))
        entry = {"mean": mean, "std": std, "per_seed": per_seed, "wilson95": [low, high]}
        if smartfed and label != "smartfed" and len(pooled) == len(smartfed):
            entry["smartfed_minus"] = paired_bootstrap(smartfed, pooled)
        summary[label] = entry
    return summary


def render_markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    seeds = list(results["seeds"])
    lines = [
        f"Held-out items: {results['test_items']} (`{results['config']['composite']}`), seeds: {', '.join(seeds)}.",
        "",
        "| system | score (mean ± std over seeds) | 95% Wilson (pooled items) | SmartFed − system, paired [95% bootstrap] |",
        "|---|---|---|---|",
    ]
    for label, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean"]):
        diff = s.get("smartfed_minus")
        diff_text = f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else ""
        lines.append(
            f"| {label} | {s['mean']:.3f} ± {s['std']:.3f} | [{s['wilson95'][0]:.3f}, {s['wilson95'][1]:.3f}] | {diff_text} |"
        )
    lines += ["", "Gates (100 held-out items of each skill):", "", "| system on skill | score |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in results["gates"].items()]
    memo = [
        (seed, m, e["train_score"], sum(e["items"]) / len(e["items"]))
        for seed, d in results["seeds"].items()
        for m, e in d.items()
        if "train_score" in e
    ]
    lines += [
        "",
        "Memorisation check (training items vs held-out items):",
        "",
        "| seed | method | train | held-out |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {m} | {t:.3f} | {h:.3f} |" for s, m, t, h in memo]
    return "\n".join(lines) + "\n"


def print_table(console: Console, results: dict[str, Any]) -> None:
    table = Table(
        title=f"{results['config']['composite']}: {results['test_items']} held-out items, seeds {', '.join(results['seeds'])}"
    )
    for column in ("system", "score", "± std", "95% Wilson", "SmartFed − system [95%]"):
        table.add_column(column)
    for label, s in sorted(results["summary"].items(), key=lambda kv: -kv[1]["mean"]):
        diff = s.get("smartfed_minus")
        table.add_row(
            label,
            f"{s['mean']:.3f}",
            f"{s['std']:.3f}",
            f"[{s['wilson95'][0]:.3f}, {s['wilson95'][1]:.3f}]",
            f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else "",
        )
    console.print(table)
    for gate, value in results["gates"].items():
        console.print(f"gate  {gate}: {value:.3f}")


def plot_rounds(results: dict[str, Any], path: Path) -> None:
    """Held-out metric vs round for the federated systems (one line per seed), static systems as levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {"smartfed": "tab:blue", "fedit": "tab:orange"}
    for seed, data in results["seeds"].items():
        for method, colour in colours.items():
            rows = [r for r in data.get(method, {}).get("rows", []) if r.get("eval_score") is not None]
            if rows:
                ax.plot(
                    [r["round"] for r in rows],
                    [r["eval_score"] for r in rows],
                    marker="o",
                    color=colour,
                    alpha=0.8,
                    label=method if seed == next(iter(results["seeds"])) else None,
                )
    for label, style in (("base", ":"), ("merge:sum", "--"), ("chance", "-.")):
        if label in results["summary"]:
            ax.axhline(results["summary"][label]["mean"], linestyle=style, color="grey", label=label)
    best_adapter = max(
        (k for k in results["summary"] if k.startswith("adapter:")),
        key=lambda k: results["summary"][k]["mean"],
        default=None,
    )
    if best_adapter:
        ax.axhline(
            results["summary"][best_adapter]["mean"], linestyle="-", color="tab:green", alpha=0.6, label=best_adapter
        )
    ax.set_xlabel("round")
    ax.set_ylabel(f"held-out {results['config']['composite']} score")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
