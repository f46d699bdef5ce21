"""Generic text for second-moment statistics: what the base model writes itself from plain starts.

MEMIT and AlphaEdit weigh an update against the covariance of the edited layers' keys on
ordinary text (their authors: 100,000 Wikipedia samples). This project fetches nothing at run
time, and the benchmark files hold short cloze prompts, not running text; so the model writes
its own: documents begun with a document-start token and a plain word, sampled (top-k), seeded,
and cached on disk per model and settings.
"""

from __future__ import annotations

import hashlib
import json

import torch
from tqdm.auto import tqdm

from ..io import atomic_write_json
from ..lm import hf_generate
from ..models import cache_root, model_fingerprint
from ..stages.variants import PREFIX_STARTS

DEFAULT_TOKENS = 120_000  # the floor is 100,000; a margin so the count holds for any tokenizer


@torch.no_grad()
def sampled_text(model, tokenizer, tokens: int = DEFAULT_TOKENS, length: int = 256, batch_size: int = 32,
                 top_k: int = 50, seed: int = 0, progress: bool = True) -> list[str]:
    """Documents of up to `length` new tokens each until they hold `tokens` tokens in all (counted
    as the tokenizer reads the texts back)."""
    settings = {"tokens": tokens, "length": length, "batch_size": batch_size, "top_k": top_k, "seed": seed}
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(model, progress), **settings}).encode())
    path = cache_root() / "generic-text" / f"{key.hexdigest()[:24]}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))["texts"]
    doc = tokenizer.get_vocab().get("<|endoftext|>", tokenizer.bos_token_id)
    lead = [] if doc is None else [doc]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts, count, drawn = [], 0, 0
    bar = tqdm(total=tokens, desc="generic text", unit="tok", disable=not progress, leave=False)
    with torch.random.fork_rng(devices=[]):  # HF sampling draws from the global generator
        torch.manual_seed(seed)
        while count < tokens:
            starts = [PREFIX_STARTS[(drawn + j) % len(PREFIX_STARTS)] for j in range(batch_size)]
            ids = [lead + tokenizer(s, add_special_tokens=False)["input_ids"] for s in starts]
            drawn += batch_size
            for _, width, out in hf_generate(model, ids, pad, batch_size, do_sample=True, top_k=top_k, top_p=1.0,
                                             temperature=1.0, max_new_tokens=length):
                for row in out:
                    text = tokenizer.decode(row, skip_special_tokens=True).strip()
                    n = len(tokenizer(text)["input_ids"])
                    texts.append(text)
                    count += n
                    bar.update(n)
    bar.close()
    atomic_write_json(path, {**settings, "count": count, "texts": texts})
    return texts
