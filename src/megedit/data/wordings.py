"""Relation wordings: a prompt with its subject replaced by `{}`; the sentence of a text that holds a
position (a context sentence before it dropped)."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?]\s+|\n+")


def sentence_start(text: str, at: int) -> int:
    """Where the sentence holding position `at` of `text` starts: after the last sentence end before it."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, at)]
    return ends[-1] if ends else 0


def relation_template(text: str, subject: str | None) -> str | None:
    """`text` with its subject replaced by `{}` (first occurrence); None without the subject."""
    if not subject or subject not in text:
        return None
    return text.replace("{", "{{").replace("}", "}}").replace(subject.replace("{", "{{").replace("}", "}}"), "{}", 1)


def behind_prefix(wording: str, prompt: str) -> bool:
    """Whether `wording` is `prompt` behind a context prefix (as build_variants writes it): it asks
    no question of its own."""
    return wording.endswith(" " + prompt)
