"""A subject for an edit that names none: the longest run of capitalised words in its prompt.

The router's negatives, the question gate and the specificity probes all start from an edit's
subject. Facts as users write them ("The capital of Canada is" -> "Vancouver") seldom say which
words are the subject. In such short prompts it is nearly always the named entity, and English
capitalises names: "Canada", "Golden Gate Bridge", "Statue of Liberty", "Albert Einstein". A
`subject` field given with the data always wins.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Sequence

from .requests import EditRequest

log = logging.getLogger(__name__)

# lowercase words that join the capitalised parts of one name ("Statue of Liberty", "Lord of the Rings")
_JOINERS = frozenset({"of", "the", "and", "&", "de", "du", "la", "le", "von", "van", "der", "del", "di", "da"})
# capitalised only because a sentence starts with them
_SENTENCE_OPENERS = frozenset(
    "the a an who what where when which why how whose whom is are was were do does did can could will would should "
    "in on at of for to from by with as and but or if it its this that these those there here i my our your their "
    "he she they we you him her them tell name please describe give list".split())
_TRIM = "\"'“”‘’()[]{}<>«»,.;:!?"


def infer_subject(prompt: str) -> str | None:
    """The longest run of capitalised words of `prompt` (lowercase joiners inside it, a sentence's
    opening word such as "The" or "Who" left out); None when there is none."""
    runs: list[list[tuple[int, int]]] = [[]]
    pending: list[tuple[int, int]] = []  # joiners after the run, kept if another name word follows
    opening = True
    for m in re.finditer(r"\S+", prompt):
        word = m.group()
        bare = word.rstrip(_TRIM)
        possessive = bare.endswith(("'s", "’s"))
        core = bare.removesuffix("'s").removesuffix("’s").strip(_TRIM)
        at = m.start() + word.index(core)
        span = (at, at + len(core)) if core else None
        run = runs[-1]
        if span and (core[0].isupper() or core[0].isdigit() and run) and not (
                opening and core.lower() in _SENTENCE_OPENERS):
            run += pending + [span]
            pending = []
        elif span and run and core.lower() in _JOINERS and bare == word:
            pending.append(span)
        else:
            runs.append([])
            pending = []
        if runs[-1] and (possessive or bare != word):  # a comma, a stop or a possessive ends the name
            runs.append([])
            pending = []
        opening = word.endswith((".", "!", "?", ":"))
    spans = [prompt[r[0][0]:r[-1][1]] for r in runs if r and any(prompt[a].isupper() for a, _ in r)]
    return max(spans, key=len) if spans else None


def with_subjects(requests: Sequence[EditRequest], source: str = "edits") -> list[EditRequest]:
    """The requests, each without a subject given the one `infer_subject` finds in its prompt (one log line)."""
    out = [r if r.subject else dataclasses.replace(r, subject=infer_subject(r.prompt)) for r in requests]
    found = [(r.prompt, o.subject) for r, o in zip(requests, out) if not r.subject and o.subject]
    if found:
        missing = sum(not r.subject for r in requests)
        log.info("%s: subject taken from the prompt's capitalised words for %d of %d records without one "
                 "(e.g. %r in %r; a `subject` field chooses it)", source, len(found), missing, found[0][1], found[0][0])
    return out
