"""Chat replies to edited questions, as a user of an instruct model meets them (METHOD.md §3.1).

Each scored edit's prompt and first rephrase go in as one-turn chats through the tokenizer's chat
template; the reply is decoded greedily up to the end-of-turn token or a budget. Three rates, for
the edited model and the unedited one on the same chats:

- holds: the reply contains the target (whole words, case-insensitive);
- ends: the reply ends with end-of-turn within the budget;
- degenerate: the reply loops (a run of 1-8 words repeated three times in a row, or one line said
  three times).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from typing import Sequence

from ..data.prompts import PRESETS
from ..data.requests import EditRequest
from ..lm import end_of_turn_ids
from ..runtime.subject import Query, Subject
from .metrics import percent

CHAT_BUDGET = 48  # new tokens per reply
_MAX_LOOP = 8  # the longest run of words a loop is looked for in


def chat_queries(requests: Sequence[EditRequest], limit: int | None) -> list[Query]:
    """The prompt and first rephrase of the first `limit` edits (all with None) as chat queries."""
    queries = []
    for r in requests[:limit]:
        queries.append(Query(r.case_id, "chat", r.prompt, r.target))
        queries += [Query(r.case_id, "chat", r.rephrases[0], r.target)] if r.rephrases else []
    return queries


def holds_target(reply: str, target: str) -> bool:
    """The target stands in the reply as whole words, case-insensitive."""
    return re.search(rf"(?<!\w){re.escape(target.strip().lower())}(?!\w)", reply.lower()) is not None


def is_degenerate(reply: str) -> bool:
    """A loop: a run of 1-8 words repeated three times in a row, or one non-empty line three times."""
    lines = Counter(line.strip().lower() for line in reply.splitlines() if line.strip())
    if lines and max(lines.values()) >= 3:
        return True
    words = reply.lower().split()
    for n in range(1, _MAX_LOOP + 1):
        for i in range(len(words) - 3 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return True
    return False


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_settings(s, subject: Subject):
    """The decode settings of chat replies: the chat format, the budget, end-of-turn as the stop."""
    return replace(s, prompt_format=PRESETS["chat"], max_new_tokens=CHAT_BUDGET,
                   stops=tuple(end_of_turn_ids(subject.model, subject.tokenizer)))


def score_chat(queries: Sequence[Query], edited: Sequence[list[int]], base: Sequence[list[int]], tok,
               stops: Sequence[int]) -> tuple[list[dict], dict]:
    """Per-chat rows and the three rates (percent) of the edited and the unedited replies."""
    rows = []
    for q, mine, theirs in zip(queries, edited, base):
        reply, base_reply = (tok.decode(t, skip_special_tokens=True).strip() for t in (mine, theirs))
        rows.append({"case_id": q.case_id, "kind": "chat", "query": q.text, "expected": q.target, "got": reply,
                     "base": base_reply, "holds": holds_target(reply, q.target),
                     "ends": bool(mine) and mine[-1] in stops, "degenerate": is_degenerate(reply),
                     "base_holds": holds_target(base_reply, q.target), "base_ends": bool(theirs) and theirs[-1] in stops,
                     "base_degenerate": is_degenerate(base_reply)})
    rates = {who: {rate: percent([r[prefix + rate] for r in rows]) for rate in ("holds", "ends", "degenerate")}
             for who, prefix in (("edited", ""), ("base", "base_"))}
    return rows, rates
