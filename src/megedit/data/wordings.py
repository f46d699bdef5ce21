"""Relation wordings: a prompt with its subject replaced by `{}`."""

from __future__ import annotations


def relation_template(text: str, subject: str | None) -> str | None:
    """`text` with its subject replaced by `{}` (first occurrence); None without the subject."""
    if not subject or subject not in text:
        return None
    return text.replace("{", "{{").replace("}", "}}").replace(subject.replace("{", "{{").replace("}", "}}"), "{}", 1)
