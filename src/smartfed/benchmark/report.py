"""Compare finished runs: ``comparison.md`` (mean ± std over seeds) and plots, rebuilt from run folders alone.

Reads what ``smartfed.run.folder`` writes (``config.json``, ``metrics.jsonl``,
``summary.json`` when the run finished) and groups runs by method (and
``--method_options``, so ablations of one method stay apart). Per method:

- the final held-out metric (the last evaluated round), mean ± sample std over seeds;
- rounds to reach ``target`` (first evaluated round with metric ≥ target),
  over the seeds that reached it, with how many did;
- total uplink bytes (state + extras, all rounds), wall time (sum of the rounds'
  wall seconds, evaluation included), and energy (sum of the rounds' kWh, with
  how it was obtained: CodeCarbon's estimate is not a measurement).

Every file is written to a temporary file and renamed (``atomic_write_bytes``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..run.config import RunConfig
from ..run.folder import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RunFolder, atomic_write_bytes, atomic_write_json

COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
PLOT_ROUND = "metric_vs_round.png"
PLOT_UPLINK = "metric_vs_uplink.png"
# fields that legitimately differ between the runs of one comparison
_VARYING = {"method", "method_options", "seed", "output_dir"}


@dataclass
class RunRecord:
    """One run folder, read."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    finished: bool  # summary.json present
    failure: str | None = None  # summary.json's reason when the run trained nothing ("status": "failed")

    @property
    def label(self) -> str:
        options = str(self.config.get("method_options") or "")
        return f"{self.config.get('method', '?')} [{options}]" if options else str(self.config.get("method", "?"))

    @property
    def metric(self) -> str:
        return next((str(r["eval_metric"]) for r in self.rows if r.get("eval_metric")), "score")

    def scored(self) -> list[tuple[int, float]]:
        """(round, held-out metric) of every evaluated round."""
        return [(int(r["round"]), float(r["eval_score"])) for r in self.rows if r.get("eval_score") is not None]

    def final_score(self) -> float | None:
        scored = self.scored()
        return scored[-1][1] if scored else None

    def rounds_to(self, target: float) -> int | None:
        return next((rnd for rnd, score in self.scored() if score >= target), None)

    def uplink_bytes(self) -> int:
        return sum(int(r.get("bytes_up") or 0) for r in self.rows)

    def cumulative_uplink(self) -> dict[int, int]:
        """round → uplink bytes of all rounds up to it."""
        total, out = 0, {}
        for r in self.rows:
            total += int(r.get("bytes_up") or 0)
            out[int(r["round"])] = total
        return out

    def wall_seconds(self) -> float:
        return sum(float(r.get("wall_seconds") or 0.0) for r in self.rows)

    def energy_kwh(self) -> float | None:
        """Sum over rounds; None unless every round has an estimate (a partial sum would mislead)."""
        values = [r.get("energy_kwh") for r in self.rows]
        return sum(values) if values and all(v is not None for v in values) else None

    def energy_methods(self) -> set[str]:
        return {str(r["energy_method"]) for r in self.rows if r.get("energy_method")}


def is_run_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders among ``paths`` and below them (sorted, each once)."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such folder")
        if is_run_folder(path):
            found.add(path.resolve())
            continue
        found.update(p.parent.resolve() for p in path.rglob(CONFIG_FILE) if is_run_folder(p.parent))
    if not found:
        raise FileNotFoundError(f"no run folder (with {CONFIG_FILE} and {METRICS_FILE}) in {[str(p) for p in paths]}")
    return sorted(found)


def load_run(path: str | os.PathLike) -> RunRecord:
    folder = RunFolder(path)
    config = folder.read_config()
    try:
        rows = folder.read_metrics()
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder.path / METRICS_FILE}: not valid JSON lines ({err})") from err
    summary_file = folder.path / SUMMARY_FILE
    failure = None
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{summary_file}: not valid JSON ({err})") from err
        if isinstance(summary, dict) and summary.get("status") == "failed":
            failure = str(summary.get("reason") or "failed")
    return RunRecord(folder.path, config, rows, summary_file.is_file(), failure)


def load_runs(paths: Sequence[Path]) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """The readable runs, and (path, reason) of each damaged one: one bad folder does not sink the report."""
    runs, damaged = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except (ValueError, OSError) as err:
            damaged.append((path, " ".join(str(err).split())))
    if not runs:
        listed = "; ".join(f"{p}: {why}" for p, why in damaged)
        raise ValueError(f"no readable run folder: {listed}")
    return runs, damaged


def default_output(dirs: Sequence[str | os.PathLike]) -> Path:
    """Where ``report`` writes without ``--output``: the runs' own tree, never a far ancestor such as / or $HOME.

    The common folder of ``dirs`` (its parent for a single run folder) is used when every
    given folder lies at most two levels below it (``<out>/<method>/seed<k>`` as ``compare``
    writes); otherwise the runs share no run tree and ``--output`` is required.
    """
    resolved = [Path(d).expanduser().resolve() for d in dirs]
    common = Path(os.path.commonpath(resolved))
    out = common.parent if is_run_folder(common) else common
    far = [d for d in resolved if len(d.relative_to(out).parts) > 2]
    if far or out == Path(out.anchor) or out == Path.home().resolve():
        raise ValueError(
            f"the runs {[str(d) for d in dirs]} share no run tree (their common folder is {out}): give --output"
        )
    return out


# --- statistics and formatting ------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (ddof 1; 0 for one value); None for no value."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def human_bytes(n: float) -> str:
    """Decimal units: 1 kB = 1000 B (as network volumes are counted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _pm(stats: tuple[float, float] | None, fmt: str = "{:.3f}") -> str:
    if stats is None:
        return "—"
    return f"{fmt.format(stats[0])} ± {fmt.format(stats[1])}"


@dataclass
class MethodRow:
    """One line of the comparison: a method over its seeds."""

    label: str
    runs: list[RunRecord]
    target: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def compute(self) -> MethodRow:
        finals = [s for s in (r.final_score() for r in self.runs) if s is not None]
        energy = [r.energy_kwh() for r in self.runs]
        self.stats = {
            "seeds": sorted(int(r.config.get("seed", 0)) for r in self.runs),
            "rounds": sorted({len(r.rows) for r in self.runs}),
            "unfinished": sum(not r.finished for r in self.runs),
            "final": mean_std(finals),
            "uplink": mean_std([float(r.uplink_bytes()) for r in self.runs]),
            "wall": mean_std([r.wall_seconds() for r in self.runs]),
            "energy": mean_std([e for e in energy if e is not None]) if all(e is not None for e in energy) else None,
            "energy_methods": sorted(set().union(*(r.energy_methods() for r in self.runs))),
        }
        if self.target is not None:
            reached = [n for n in (r.rounds_to(self.target) for r in self.runs) if n is not None]
            self.stats["to_target"] = mean_std([float(n) for n in reached])
            self.stats["reached"] = len(reached)
        return self

    def cells(self) -> list[str]:
        s = self.stats
        uplink = "—" if s["uplink"] is None else f"{human_bytes(s['uplink'][0])} ± {human_bytes(s['uplink'][1])}"
        out = [self.label, ", ".join(map(str, s["seeds"])), _pm(s["final"])]
        if self.target is not None:
            n = len(self.runs)
            reached = "never" if not s["reached"] else _pm(s["to_target"], "{:.1f}")
            out.append(f"{reached} ({s['reached']}/{n} seeds)")
        out += [uplink, _pm(s["wall"], "{:.1f}"), _pm(s["energy"], "{:.3g}")]
        return out


def _config_differences(runs: Sequence[RunRecord]) -> dict[str, list[Any]]:
    """Config fields (other than method, options, seed, folder) whose values differ between runs."""
    keys = set().union(*(r.config for r in runs)) - _VARYING
    # a key a config.json lacks (written before the setting existed) holds the setting's default
    defaults = {f.name: f.default for f in fields(RunConfig)}
    out = {}
    for key in sorted(keys):
        values = {json.dumps(r.config.get(key, defaults.get(key)), sort_keys=True) for r in runs}
        if len(values) > 1:
            out[key] = sorted(json.loads(v) for v in values)
    return out


def build_rows(runs: Sequence[RunRecord], target: float | None = None) -> list[MethodRow]:
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return [
        MethodRow(label, sorted(g, key=lambda r: r.config.get("seed", 0)), target).compute()
        for label, g in groups.items()
    ]


def render_markdown(
    runs: Sequence[RunRecord],
    rows: Sequence[MethodRow],
    target: float | None,
    damaged: Sequence[tuple[Path, str]] = (),
) -> str:
    metrics = sorted({r.metric for r in runs})
    metric = metrics[0] if len(metrics) == 1 else "/".join(metrics)
    header = ["method", "seeds", f"final {metric} (mean ± std)"]
    if target is not None:
        header.append(f"rounds to {metric} ≥ {target:g}")
    header += ["uplink bytes, total", "wall time (s)", "energy (kWh)"]
    lines = [
        "# Comparison",
        "",
        f"{len(runs)} runs, {len(rows)} methods. Mean ± sample std over seeds; the final metric is the last "
        "evaluated round's held-out score"
        + (f"; rounds to target over the seeds that reached {target:g}" if target is not None else "")
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    lines.append("")
    energy_methods = sorted(set().union(*(set(row.stats["energy_methods"]) for row in rows)))
    lines.append("Energy: " + ("; ".join(energy_methods) if energy_methods else "not recorded") + ".")
    if any(row.stats["energy"] is None for row in rows):
        lines.append("A method without energy has a round without an estimate (`--energy none` or CodeCarbon failing).")
    unfinished = [row.label for row in rows if row.stats["unfinished"]]
    if unfinished:
        lines.append(f"Unfinished runs (no summary.json) in: {', '.join(unfinished)}.")
    failed = [r for r in runs if r.failure]
    if failed:
        lines.append(
            "Failed runs (they trained nothing; summary.json says why): "
            + "; ".join(f"`{display_path(r.path)}` ({r.failure})" for r in failed)
            + "."
        )
    if damaged:
        lines.append("Skipped damaged runs: " + "; ".join(f"`{display_path(p)}` ({why})" for p, why in damaged) + ".")
    rounds = {row.label: row.stats["rounds"] for row in rows if len(row.stats["rounds"]) > 1}
    if rounds or len({tuple(row.stats["rounds"]) for row in rows}) > 1:
        lines.append("Rounds recorded differ: " + ", ".join(f"{row.label} {row.stats['rounds']}" for row in rows) + ".")
    seeds = {tuple(row.stats["seeds"]) for row in rows}
    if len(seeds) > 1:
        lines.append("Methods ran on different seeds, so on different partitions: the comparison is not paired.")
    differences = _config_differences(runs)
    if differences:
        lines.append(
            "Settings that differ between runs: " + "; ".join(f"`{k}` {v}" for k, v in differences.items()) + "."
        )
    lines += ["", "Runs:", ""]
    lines += [f"- `{display_path(r.path)}` ({r.label}, seed {r.config.get('seed')})" for r in runs]
    lines += ["", f"Plots: [{PLOT_ROUND}]({PLOT_ROUND}), [{PLOT_UPLINK}]({PLOT_UPLINK}).", ""]
    return "\n".join(lines)


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when under it (a report that can be committed), else absolute."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _mean_curve(points: Sequence[dict[float, float]]) -> tuple[list[float], list[float], list[float]]:
    """x values present in every run, with the mean and std of y over runs."""
    xs = sorted(set.intersection(*(set(p) for p in points))) if points else []
    means, stds = [], []
    for x in xs:
        m, s = mean_std([p[x] for p in points]) or (math.nan, math.nan)
        means.append(m)
        stds.append(s)
    return xs, means, stds


# One (colour, marker) per known method, every pair distinct (colours from the Tableau palettes, markers
# matplotlib draws at small sizes): a method keeps its look across every plot. SmartFed is black.
METHOD_STYLES: dict[str, tuple[str, str]] = {
    "smartfed": ("#000000", "o"),
    "smartfed_module": ("#7f7f7f", "s"),
    "mole": ("#9467bd", "^"),
    "a3smoe": ("#17becf", "v"),
    "merge": ("#8c564b", "D"),
    "lorahub": ("#e377c2", "P"),
    "fedit": ("#d62728", "X"),
    "flora": ("#1f77b4", "*"),
    "flexlora": ("#2ca02c", "<"),
    "hetlora": ("#ff7f0e", ">"),
    "fedsa": ("#bcbd22", "h"),
    "fedlease": ("#393b79", "p"),
}
# What an unknown name (another method, or a known one with --method_options) draws from.
_FALLBACK_COLOURS = (
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
)  # fmt: skip
_FALLBACK_MARKERS = ("d", "8", "H", "1", "2", "3", "4", "+", "x", "|")


def method_style(name: str, taken: Iterable[tuple[str, str]] = ()) -> tuple[str, str]:
    """(colour, marker) of the method or plot label ``name``.

    A known method name gets its fixed pair (``METHOD_STYLES``). Any other name gets a pair
    picked by a hash of the name (sha256, so the same on every machine and run), from colours
    and markers no known method uses, stepping on past the pairs in ``taken`` (those already on
    the plot) so that no two lines of one plot look alike.
    """
    taken = set(taken)
    if name in METHOD_STYLES and METHOD_STYLES[name] not in taken:
        return METHOD_STYLES[name]
    pairs = [(c, m) for m in _FALLBACK_MARKERS for c in _FALLBACK_COLOURS]
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % len(pairs)
    for i in range(len(pairs)):
        pair = pairs[(start + i * 11) % len(pairs)]  # 11 is coprime with 140: every pair is reached once
        if pair not in taken:
            return pair
    return pairs[start]  # more lines than pairs: a repeat cannot be avoided


def write_plots(rows: Sequence[MethodRow], out: Path) -> list[Path]:
    """Metric vs round, and metric vs cumulative uplink bytes: the seeds' mean, ± std shaded."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    styles: dict[str, tuple[str, str]] = {}  # label -> (colour, marker), the same in both plots
    for row in rows:
        styles[row.label] = method_style(row.label, styles.values())
    written = []
    for name, xlabel in ((PLOT_ROUND, "round"), (PLOT_UPLINK, "cumulative uplink bytes")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for row in rows:
            if name == PLOT_ROUND:
                points = [{float(rnd): s for rnd, s in r.scored()} for r in row.runs]
                xs, ys, sd = _mean_curve(points)
            else:  # per round: the seeds' mean cumulative bytes against their mean metric
                per_round = [dict(r.scored()) for r in row.runs]
                rounds = sorted(set.intersection(*(set(p) for p in per_round))) if per_round else []
                cum = [r.cumulative_uplink() for r in row.runs]
                xs = [statistics.fmean(c[rnd] for c in cum) for rnd in rounds]
                ys = [statistics.fmean(p[rnd] for p in per_round) for rnd in rounds]
                sd = [(mean_std([p[rnd] for p in per_round]) or (0.0, 0.0))[1] for rnd in rounds]
            if not xs:
                continue
            colour, marker = styles[row.label]
            legend = f"{row.label} (n={len(row.runs)})"
            line = ax.plot(xs, ys, color=colour, marker=marker, markersize=5, label=legend)[0]
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd, strict=True)],
                [y + s for y, s in zip(ys, sd, strict=True)],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
        metric = rows[0].runs[0].metric if rows else "score"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {metric}")
        if name == PLOT_UPLINK:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(out / name, buffer.getvalue())
        written.append(out / name)
    return written


def write_report(
    paths: Iterable[str | os.PathLike], out: str | os.PathLike, *, target: float | None = None, plots: bool = True
) -> Path:
    """Read the run folders in/under ``paths``; write ``comparison.md``, ``comparison.json`` and the plots to ``out``."""
    if target is not None and not math.isfinite(target):
        raise ValueError(f"target={target!r} must be a finite number")
    runs, damaged = load_runs(find_runs(paths))
    rows = build_rows(runs, target)
    out = Path(out)
    atomic_write_bytes(out / COMPARISON_MD, render_markdown(runs, rows, target, damaged).encode())
    atomic_write_json(
        out / COMPARISON_JSON,
        {
            "target": target,
            "methods": {row.label: {**row.stats, "runs": [display_path(r.path) for r in row.runs]} for row in rows},
            "failed": {display_path(r.path): r.failure for r in runs if r.failure},
            "skipped_damaged": {display_path(p): why for p, why in damaged},
        },
    )
    if plots:
        write_plots(rows, out)
    return out / COMPARISON_MD
