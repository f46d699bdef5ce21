"""The built-in demo set: 12 counterfactual edits written for megedit (famous places, people and
things the small default model knows) and a pseudo-edit pool of 40 true facts in the same style
(for the encoder's training and the router's calibration; no overlap with the edits)."""

from __future__ import annotations

from pathlib import Path

from .loaders import load_requests
from .requests import EditRequest

HERE = Path(__file__).resolve().parent
DEMO_EDITS, DEMO_POOL = HERE / "demo-edits.jsonl", HERE / "demo-pool.jsonl"


def demo_requests() -> tuple[list[EditRequest], list[EditRequest]]:
    """(the demo edits, the demo pseudo-edit pool)."""
    return load_requests("jsonl", DEMO_EDITS), load_requests("jsonl", DEMO_POOL)
