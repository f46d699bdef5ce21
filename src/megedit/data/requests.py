"""The unit of editing: one fact to change, with the queries that test it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class LocalityQuery:
    """An unrelated query whose answer must not change; `answer` is the gold answer if known."""

    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class EditRequest:
    """Make the model answer `target` after `prompt`.

    `rephrases` test generality (the same fact asked differently); `locality` queries test
    that unrelated knowledge is untouched; `specificity` prompts ask something else about the same
    subject, whose answer must not change either. Scoring uses the first rephrase and locality
    query, and every specificity prompt.
    """

    case_id: str
    prompt: str
    target: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: tuple[str, ...] = ()
    locality: tuple[LocalityQuery, ...] = field(default_factory=tuple)
    specificity: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The project's own JSONL record (what `load_requests("jsonl", ...)` reads)."""
        record = asdict(self)
        record["rephrases"] = list(self.rephrases)
        record["locality"] = [asdict(q) for q in self.locality]
        record["specificity"] = list(self.specificity)
        return record


def pool_apart_from(pool: Sequence[EditRequest], edits: Sequence[EditRequest]) -> list[EditRequest]:
    """The pool records that share neither a case id nor a prompt with any of `edits`: a
    pseudo-edit pool never stands in for the facts being edited."""
    ids, prompts = {r.case_id for r in edits}, {r.prompt for r in edits}
    return [r for r in pool if r.case_id not in ids and r.prompt not in prompts]
