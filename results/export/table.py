"""The table of results/export/export.md from the export reports in RECORDS (``smartfed_export.json`` copies).

Usage: python results/export/table.py results/export/records > results/export/export.md
One row per report: the four scores the export command measured on the same held-out items in one process
(base, routed, the static SVD export and the distilled export), the distilled export's share of the routed
score, and the distillation's KL to the routed model before and after.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(report: dict) -> str:
    scores, d = report["scores"], report["distill"]
    routed = scores["routed"]["score"]
    share = f"{scores['export']['score'] / routed:.1%}" if routed > 0 else "n/a"
    cells = [
        d["task"],
        str(report["rank"]),
        *(f"{scores[k]['score']:.3f}" for k in ("base", "routed", "svd", "export")),
        share,
        f"{d['kl_before']:.3f} → {d['kl_after']:.3f}",
        f"{d['loss']}, {d['data']}, {d['steps']} steps, lr {d['learning_rate']:g}, {d['examples']} prompts",
        str(int(scores["routed"]["n"])),
    ]
    return "| " + " | ".join(cells) + " |"


def main(records: Path) -> None:
    head = [
        "composite",
        "R",
        "base",
        "routed",
        "SVD export",
        "distilled",
        "distilled / routed",
        "KL",
        "distillation",
        "n",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in sorted(records.glob("*.json")):
        print(_row(json.loads(path.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
