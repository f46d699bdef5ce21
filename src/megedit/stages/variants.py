"""Other wordings of an edit's query, for stage A's robust fitting and stage D's conditions.

A neuron fitted on one wording alone carries the edit to a paraphrase for only a third of the
edits (METHOD.md §2.2). Fitting it on several wordings at once, all sharing the one vector, and
teaching the generator that each of them maps to that vector, carries it much further. The
wordings come from two sources, neither of which reads the edit record's own test queries:

- **context prefixes**: short neutral sentences the base model writes itself from a few plain
  starts, put before the prompt (as ROME/MEMIT's context templates do);
- **pool paraphrases**: pseudo-edit records whose prompt has the same relation wording as the
  edit's (the prompt with its subject replaced by `{}`) lend their rephrase's wording (its last
  sentence, subject replaced by `{}`), filled with the edit's subject.

Records without a subject, or whose wording no pool record shares, get prefixes only.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.requests import EditRequest
from ..data.wordings import relation_template, sentence_start
from ..errors import ConfigError
from ..lm import left_pad, model_device

# starts for the context prefixes: plain, topic-free openings
PREFIX_STARTS = ("The", "In", "It", "When", "This", "After", "Many", "Our", "She", "We", "There", "A")
EXCLUDE_MODES = ("none", "own", "all")


def rephrase_template(rephrase: str, subject: str | None) -> str | None:
    """The wording of a rephrase: the sentence holding the subject, anything before it (a
    context sentence) dropped, subject replaced by `{}`."""
    if not subject or subject not in rephrase:
        return None
    return relation_template(rephrase[sentence_start(rephrase, rephrase.index(subject)):].strip(), subject)


def paraphrase_templates(pool: Sequence[EditRequest], min_count: int = 2) -> dict[str, list[str]]:
    """Relation wording of a prompt -> the rephrase wordings that at least `min_count` pool records
    of that wording use (one-off wordings are mostly the tail of a context sentence), most used
    first (ties by text)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in pool:
        key = relation_template(record.prompt, record.subject)
        for rephrase in record.rephrases:
            wording = rephrase_template(rephrase, record.subject)
            if key and wording and wording != key:
                counts[key][wording] += 1
    return {k: [w for w, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
            for k, c in counts.items()}


def excluded_templates(requests: Sequence[EditRequest], mode: str) -> list[set[str]]:
    """Benchmark-only: per edit, the wordings its variants must not use. "own": the wordings of
    its own rephrases; "all": those of every edit's rephrases; "none": nothing."""
    if mode not in EXCLUDE_MODES:
        raise ConfigError(f"exclude_eval_templates must be one of {', '.join(EXCLUDE_MODES)}, found {mode!r}")
    own = [{w for q in r.rephrases if (w := rephrase_template(q, r.subject))} for r in requests]
    if mode == "all":
        union = set().union(*own) if own else set()
        return [union for _ in requests]
    return own if mode == "own" else [set() for _ in requests]


def _pick(options: Sequence[str], k: int, case_id: str, seed: int, salt: str) -> list[str]:
    """k of the options, a seeded choice per edit (so edits of one relation use different ones)."""
    if k >= len(options):
        return list(options)
    h = hashlib.sha256(f"{seed}:{salt}:{case_id}".encode()).digest()
    order = torch.randperm(len(options), generator=torch.Generator().manual_seed(int.from_bytes(h[:8], "big")))
    return [options[i] for i in sorted(order[:k].tolist())]


def build_variants(requests: Sequence[EditRequest], pool: Sequence[EditRequest], prefixes: Sequence[str],
                   n_paraphrases: int, n_prefixes: int, exclude: str = "none", seed: int = 0,
                   n_lone_prefixes: int = 0) -> list[tuple[str, ...]]:
    """Per edit, its other wordings (the prompt itself not included): up to `n_paraphrases` pool
    paraphrases, then the prompt behind `n_prefixes` of the context `prefixes` (at least
    `n_lone_prefixes` for an edit that gets no paraphrase: its prompt is all it would learn from)."""
    ids = {r.case_id for r in requests}
    templates = paraphrase_templates([r for r in pool if r.case_id not in ids])
    excluded = excluded_templates(requests, exclude)
    variants = []
    for request, skip in zip(requests, excluded):
        key = relation_template(request.prompt, request.subject)
        wordings = [w for w in templates.get(key, []) if w not in skip] if key else []
        texts = [w.format(request.subject) for w in _pick(wordings, n_paraphrases, request.case_id, seed, "paraphrase")]
        n = n_prefixes if any(t != request.prompt for t in texts) else max(n_prefixes, n_lone_prefixes)
        texts += [f"{p} {request.prompt}" for p in _pick(list(prefixes), n, request.case_id, seed, "prefix")]
        variants.append(tuple(dict.fromkeys(t for t in texts if t != request.prompt)))
    return variants


@torch.no_grad()
def context_prefixes(model, tokenizer, n: int, tokens: int = 10, seed: int = 0, progress: bool = False) -> list[str]:
    """`n` short sentences the model writes from plain starts (seeded top-10 sampling), each cut
    at its first line break and ended with a full stop. The starts follow a document-start token
    (`<|endoftext|>` where the vocabulary has one, else the BOS): without one an instruct model
    continues a bare word with code or hyphenated fragments. `progress`: a bar over the tokens
    (off by default, as for every helper that callers without bars use)."""
    if n <= 0:
        return []
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(n)]
    doc = tokenizer.get_vocab().get("<|endoftext|>", tokenizer.bos_token_id)
    lead = [] if doc is None else [doc]
    seqs = [ids if ids[:1] == lead else lead + ids for ids in (tokenizer(s)["input_ids"] for s in starts)]
    rng = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for _ in tqdm(range(tokens), desc="context prefixes", disable=not progress, leave=False):
        batch = left_pad(seqs, pad, model_device(model))
        logits = model(**batch.model_inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu()
        top = logits.topk(min(10, logits.shape[-1]))
        picked = torch.multinomial(top.values.softmax(-1), 1, generator=rng).squeeze(-1)
        seqs = [s + [int(top.indices[r, picked[r]])] for r, s in enumerate(seqs)]
    texts = []
    for s in seqs:
        text = tokenizer.decode(s[len(lead):], skip_special_tokens=True).split("\n")[0].strip()
        texts.append(text if text.endswith((".", "!", "?")) else text.rstrip(",;: ") + ".")
    return texts
