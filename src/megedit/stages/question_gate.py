"""The question gate: an edit fires only where its own question is asked about its subject.

The router's embeddings are dominated by named entities, so any question about an edited subject
("The Eiffel Tower was built in the year") can land within epsilon of the edit ("The Eiffel Tower
is located in the city of"). The router's negatives hold back the other questions a pseudo-edit
pool knows; the gate holds back the ones it does not. For a query that fires an edit and names
that edit's subject, the question is the query's sentence with the subject replaced by a pronoun
("it was built in the year"). The query passes when that question's cosine to one of the edit's
own questions (its prompt and wordings, masked the same way) is at least the threshold. An edit
with a single question of its own (no paraphrase wordings: a relation the pool does not know) has
fewer chances to match a rephrase, so it gets a threshold of its own (`lone_threshold`). Queries
that do not name the subject (a paraphrase by another name, a locality prompt) and edits whose
subject is unknown pass unchanged.

Both sides are embedded by the pack's encoder. An edit's questions are embedded the first time a
query fires it, then kept.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from ..data.wordings import behind_prefix, sentence_start

PLACEHOLDER = "it"  # reads as a question about something; an "X" keeps more of the entity's weight
# an article right before the subject goes with it: "The it was painted by" leans on "The it" in every question
_ARTICLE = re.compile(r"(?:^|(?<=\s))(?:the|a|an)\s+$", re.IGNORECASE)


def question_of(text: str, subject: str | None) -> str | None:
    """The sentence of `text` that names `subject` last, the subject (with an article right before it)
    replaced by the placeholder; None when the subject is unknown or not named (case-insensitive)."""
    if not subject:
        return None
    at = text.lower().rfind(subject.lower())
    if at < 0:
        return None
    before = _ARTICLE.sub("", text[sentence_start(text, at):at])
    return f"{before}{PLACEHOLDER}{text[at + len(subject):]}".strip()


class QuestionGate:
    """Which fired queries ask their edit's own question (module docstring). Per edit row: its subject
    (or None), its prompt and its other wordings; a wording that is the prompt after a context prefix
    adds no question of its own and is left out."""

    def __init__(self, encoder, subjects: Sequence[str | None], prompts: Sequence[str],
                 wordings: Sequence[Sequence[str]], threshold: float, lone_threshold: float | None = None) -> None:
        self.encoder, self.subjects, self.threshold = encoder, subjects, threshold
        self.questions = [(p, *(w for w in ws if not behind_prefix(w, p))) for p, ws in zip(prompts, wordings)]
        self.lone_threshold = threshold if lone_threshold is None else lone_threshold
        self._masked: dict[int, list[str]] = {}  # per edit row, its distinct questions, subject masked
        self._keys: dict[int, torch.Tensor | None] = {}  # their embeddings (None: no question names the subject)

    def threshold_of(self, row: int) -> float:
        """The threshold for edit row `row`: `lone_threshold` when it has one question of its own."""
        return self.lone_threshold if len(self.masked(row)) == 1 else self.threshold

    def masked(self, row: int) -> list[str]:
        """Edit row `row`'s distinct own questions, its subject masked (those that name it)."""
        if row not in self._masked:
            found = (question_of(q, self.subjects[row]) for q in self.questions[row])
            self._masked[row] = list(dict.fromkeys(m for m in found if m))
        return self._masked[row]

    def similarity(self, texts: Sequence[str], rows: Sequence[int]) -> list[float | None]:
        """Per query, its question's best cosine to its edit row's own questions; None where the gate
        does not apply (the query or the edit does not name the subject)."""
        asked = [question_of(t, self.subjects[r]) for t, r in zip(texts, rows)]
        self._embed_keys({r for r, q in zip(rows, asked) if q is not None})
        todo = [i for i, (q, r) in enumerate(zip(asked, rows)) if q is not None and self._keys[r] is not None]
        out: list[float | None] = [None] * len(texts)
        if todo:
            embedded = self.encoder.encode([asked[i] for i in todo], progress=False).float()
            for i, e in zip(todo, embedded):
                out[i] = float((self._keys[rows[i]] @ e).max())
        return out

    def passes(self, texts: Sequence[str], rows: Sequence[int]) -> list[bool]:
        """Per query (fired, `rows` its edit's row): whether the gate lets it through."""
        return [s is None or s >= self.threshold_of(r) for s, r in zip(self.similarity(texts, rows), rows)]

    def _embed_keys(self, rows: set[int]) -> None:
        todo = sorted(r for r in rows if r not in self._keys)
        flat = [m for r in todo for m in self.masked(r)]
        sizes = [len(self.masked(r)) for r in todo if self.masked(r)]
        blocks = iter(self.encoder.encode(flat, progress=False).float().split(sizes)) if flat else iter(())
        for r in todo:
            self._keys[r] = next(blocks) if self.masked(r) else None
