"""What every results table is made with: the result files' folder, loading them, and Markdown tables."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in rows])


def load(pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))]


def metric(result: dict, kind: str, setting: str) -> str:
    """One metric of a result, or a dash where its evaluation did not ask that query kind."""
    value = result["metrics"].get(kind, {}).get(setting)
    return "—" if value is None else f"{value:.1f}"
