"""The README's headline table is the committed claims table, line for line (no figure drifts from its source)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| composite | claim (paper)"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_readme_headline_table_is_the_committed_claims_table() -> None:
    committed = _table_lines((ROOT / "results" / "claims" / "table.md").read_text(encoding="utf-8"))
    readme = _table_lines((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(committed) > 2, "results/claims/table.md has no rows"
    assert readme == committed, "README.md's headline table differs from results/claims/table.md: copy it over"
