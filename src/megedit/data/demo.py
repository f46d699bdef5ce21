"""Data written for megedit and shipped with it:

- the demo set: 12 counterfactual edits (famous places, people and things the small default model
  knows) and a pseudo-edit pool of 40 true facts in the same style, each with its subject (no
  overlap with the edits). Each edit's prompt wording is shared by two or more pool facts, so that
  it gets paraphrase wordings; no pool rephrase is worded as an edit's test rephrase;
- the fallback pool: 240 true facts over 24 relations, each with a subject, two rephrases and a
  locality prompt, every relation in one prompt wording and two rephrase wordings. It stands in
  when a user's facts come without paraphrases and no pool is given.
- sample facts as users write them: 64 with a prompt and a target only, 32 with sentence-long
  targets (tests and benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from .loaders import load_requests
from .requests import EditRequest

HERE = Path(__file__).resolve().parent
DEMO_EDITS, DEMO_POOL = HERE / "demo-edits.jsonl", HERE / "demo-pool.jsonl"
FALLBACK_POOL, OWN_FACTS, SENTENCE_FACTS = (HERE / "fallback-pool.jsonl", HERE / "own-facts-64.jsonl",
                                            HERE / "sentence-facts.jsonl")


def demo_requests() -> tuple[list[EditRequest], list[EditRequest]]:
    """(the demo edits, the demo pseudo-edit pool)."""
    return load_requests("jsonl", DEMO_EDITS), load_requests("jsonl", DEMO_POOL)


def fallback_pool() -> list[EditRequest]:
    """The shipped pseudo-edit pool of 240 true facts (see the module docstring)."""
    return load_requests("jsonl", FALLBACK_POOL)
