"""Prompts about an edit's subject that ask something else.

An edit should change one fact, not everything the model says about its subject. Two uses need
such prompts: the evaluation scores them (Specificity: the answer must stay the unedited
model's), and the method learns from them where an edit must not fire (negatives). Both are
wordings of other relations found in a pseudo-edit pool (a record's prompt with its subject
replaced by `{}`), filled with the edit's subject.

- Relations: wordings whose records have similar answers (cosine of their answer counts) are one
  relation, so "The mother tongue of {} is" and "{} is a native speaker of" are never "something
  else" for each other.
- Two disjoint halves: every wording is assigned once, by a hash of its text, to the probes (what
  the evaluation asks) or to the negatives (what the method trains on). A negative is never a
  wording the evaluation asks, on any data.
- An edit never gets a prompt of its own relation, nor of a relation another edit of the same
  subject changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

from .requests import EditRequest
from .subjects import with_subjects
from .wordings import relation_template

HALVES = ("probe", "negative")
# plain prompts about a subject that ask no relation: negatives only (written for megedit)
PLAIN_SUBJECT_PROMPTS = ("Tell me about {}.", "What do you know about {}?", "Who or what is {}?", "Describe {}.",
                         "{} is", "Here is a fact about {}:")
_SAME_RELATION = 0.5  # answer-count cosine above which two wordings are one relation
_MIN_RECORDS = 2  # a wording used by one record is mostly a one-off; not a relation


@dataclass(frozen=True)
class RelationWordings:
    """The pool's relation wordings, their relation (an int) and each relation's answers (lowercased)."""

    relation: dict[str, int]
    answers: dict[int, frozenset[str]]

    def of(self, request: EditRequest) -> set[int]:
        """The relations an edit asks: its wording's, else any whose answers hold its target or true answer."""
        wording = relation_template(request.prompt, request.subject)
        if wording in self.relation:
            return {self.relation[wording]}
        said = {a.lower() for a in (request.target, request.ground_truth) if a}
        return {rel for rel, answers in self.answers.items() if said & answers}


def wording_half(wording: str) -> str:
    """"probe" or "negative": a fixed split of wordings, the same on every machine and data set."""
    return HALVES[hashlib.sha256(wording.encode()).digest()[0] % 2]


def relation_wordings(pool: Sequence[EditRequest]) -> RelationWordings:
    """Group the pool's prompt wordings (used by at least two records) into relations by their answers."""
    answers: dict[str, Counter] = defaultdict(Counter)
    records: Counter = Counter()
    for record in pool:
        wording = relation_template(record.prompt, record.subject)
        if wording:
            records[wording] += 1
            answers[wording].update(a.lower() for a in (record.target, record.ground_truth) if a)
    kept = sorted(w for w, n in records.items() if n >= _MIN_RECORDS)
    parent = {w: w for w in kept}

    def root(w: str) -> str:
        while parent[w] != w:
            w = parent[w]
        return w

    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            if _cosine(answers[a], answers[b]) > _SAME_RELATION:
                parent[root(a)] = root(b)
    ids = {r: k for k, r in enumerate(sorted({root(w) for w in kept}))}
    relation = {w: ids[root(w)] for w in kept}
    grouped: dict[int, set[str]] = defaultdict(set)
    for w in kept:
        grouped[relation[w]].update(answers[w])
    return RelationWordings(relation, {k: frozenset(v) for k, v in grouped.items()})


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(v * b[k] for k, v in a.items() if k in b)
    return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values())) if dot else 0.0


def other_relation_prompts(requests: Sequence[EditRequest], wordings: RelationWordings, half: str, per_edit: int | None,
                           seed: int = 0, per_relation: int | None = 1) -> list[tuple[str, ...]]:
    """Per edit, prompts of up to `per_edit` other relations, `per_relation` wordings each (None: all of
    the relation's wordings in the half), relations and wordings a seeded choice per edit, filled with
    the edit's subject; () for an edit without a subject."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, found {half!r}")
    by_relation: dict[int, list[str]] = defaultdict(list)
    for w, rel in sorted(wordings.relation.items()):
        if wording_half(w) == half:
            by_relation[rel].append(w)
    taken: dict[str, set[int]] = defaultdict(set)  # relations each subject's edits change
    for r in requests:
        if r.subject:
            taken[r.subject] |= wordings.of(r)
    out = []
    for r in requests:
        if not r.subject or per_edit is not None and per_edit <= 0:
            out.append(())
            continue
        relations = [rel for rel in sorted(by_relation) if rel not in taken[r.subject]]
        picked = _seeded_order(relations, f"{seed}:{half}:{r.case_id}")[:per_edit]
        out.append(tuple(w.format(r.subject) for rel in picked
                         for w in _seeded_order(by_relation[rel], f"{seed}:{rel}:{r.case_id}")[:per_relation]))
    return out


def _seeded_order(items: Sequence, salt: str) -> list:
    """`items` in an order fixed by `salt` (independent of the process's hash seed)."""
    return sorted(items, key=lambda x: hashlib.sha256(f"{salt}:{x}".encode()).digest())


def with_specificity(requests: Sequence[EditRequest], pool: Sequence[EditRequest], per_edit: int = 3,
                     seed: int = 0) -> list[EditRequest]:
    """The requests, those without `specificity` prompts given `per_edit` probes from the pool's wordings
    (about the subject a fit would take from the prompt, for an edit that names none)."""
    requests = with_subjects(requests)
    probes = other_relation_prompts(requests, relation_wordings(pool), "probe", per_edit, seed)
    return [r if r.specificity else dataclasses.replace(r, specificity=p) for r, p in zip(requests, probes)]


def same_relation_prompts(requests: Sequence[EditRequest], pool: Sequence[EditRequest], wordings: RelationWordings,
                          per_edit: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Per edit, up to `per_edit` pool prompts that ask its relation about other subjects (a seeded
    choice per edit); () for an edit whose prompt is no pool wording (its relation is unknown)."""
    if per_edit <= 0:  # the encoder's hard negatives ask for none: skip the pass over the pool
        return [() for _ in requests]
    by_relation: dict[int, list[EditRequest]] = defaultdict(list)
    for record in pool:
        wording = relation_template(record.prompt, record.subject)
        if wording in wordings.relation:
            by_relation[wordings.relation[wording]].append(record)
    out = []
    for r in requests:
        wording = relation_template(r.prompt, r.subject) if r.subject else None
        if wording not in wordings.relation:
            out.append(())
            continue
        others = {p.prompt for p in by_relation[wordings.relation[wording]] if p.subject != r.subject}
        out.append(tuple(_seeded_order(sorted(others), f"{seed}:same:{r.case_id}")[:per_edit]))
    return out


def negative_groups(requests: Sequence[EditRequest], pool: Sequence[EditRequest], per_edit: int | None, plain: int,
                    seed: int = 0, same_relation: int = 0, wordings: RelationWordings | None = None,
                    per_relation: int | None = 1) -> list[dict[str, tuple[str, ...]]]:
    """Per edit, where it must not fire, by kind: "other" - prompts of `per_edit` other relations
    (`per_relation` wordings each) from the negative half of the pool's wordings; "plain" - `plain`
    plain prompts about its subject; "same" - `same_relation` pool prompts asking its relation about
    other subjects (`wordings`: the pool's, when the caller has them already)."""
    wordings = wordings or relation_wordings(pool)
    others = other_relation_prompts(requests, wordings, "negative", per_edit, seed, per_relation)
    neighbours = same_relation_prompts(requests, pool, wordings, same_relation, seed)
    out = []
    for r, extra, near in zip(requests, others, neighbours):
        plain_ones = _seeded_order(PLAIN_SUBJECT_PROMPTS, f"{seed}:plain:{r.case_id}")[:plain] if r.subject else []
        out.append({"other": extra, "plain": tuple(p.format(r.subject) for p in plain_ones), "same": near})
    return out


def negative_prompts(requests: Sequence[EditRequest], pool: Sequence[EditRequest], per_edit: int,
                     plain: int, seed: int = 0, same_relation: int = 0,
                     wordings: RelationWordings | None = None) -> list[tuple[str, ...]]:
    """`negative_groups` (one wording per other relation) as one tuple of distinct prompts per edit."""
    groups = negative_groups(requests, pool, per_edit, plain, seed, same_relation, wordings)
    return [tuple(dict.fromkeys(p for kind in g.values() for p in kind)) for g in groups]
