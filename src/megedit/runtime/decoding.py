"""The greedy decoder of subjects: teacher forcing and greedy decoding of queries in
length-sorted batches, each inside the subject's per-batch context (its per-row neuron vectors),
resumable from a checkpoint and shared among forked CPU processes. The harness scores with it and
`EditedModel.generate` answers with it by default, so both decode alike token for token.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.prompts import PromptFormat, stop_tokens
from ..errors import ConfigError
from ..lm import Decoded, decode, length_batches, prefix_cache
from ..parallel import barrier, ranks, run_parts
from .checkpoint import Checkpoint
from .subject import Query, Subject


GiveUp = Callable[[int, list[int]], bool]  # (query index, its output so far) -> stop decoding it


@dataclass(frozen=True)
class DecodeSettings:
    prompt_format: PromptFormat
    max_new_tokens: int = 20
    batch_size: int = 32
    processes: int = 1  # forked CPU processes sharing the batches (megedit.parallel); not in any cache key
    decode_unchanged: bool = False  # decode the queries the subject leaves unchanged too, and their references
    stops: tuple[int, ...] | None = None  # tokens that end an answer; None: a newline or EOS


def run_queries(subject: Subject, queries: Sequence[Query], prompt_ids: Sequence[list[int]],
                drafts: Sequence[list[int]], s: DecodeSettings, progress: bool, desc: str,
                give_up: GiveUp | None = None, resume: Checkpoint | None = None) -> Decoded:
    """Teacher forcing over `drafts` and greedy decoding for every query, in length-sorted
    batches inside the subject's per-batch context; results in the original order.

    With `give_up(i, tokens)` (query i's output so far), a row stops decoding as soon as it says
    so, e.g. once the output can no longer match the answer scored (the harness's early stop).
    With `resume`, batches it holds are taken from it and each finished batch is given to it.
    With `s.processes` > 1 the batches left are dealt to that many forked processes first.
    """
    result = Decoded([None] * len(queries), [None] * len(queries))
    batches = length_batches([len(p) for p in prompt_ids], s.batch_size)
    done = resume.rows(desc) if resume else {}
    todo = [idx for idx in batches if not all(i in done for i in idx)]  # a resumed batch is whole
    if (s.processes > 1 or ranks()[1] > 1) and len(todo) > 1:
        done = _decode_in_parts(subject, queries, prompt_ids, drafts, s, progress, desc, give_up, resume, todo,
                                result)
        todo = []
    for i, (forced, generated) in done.items():  # rows of a batch in `todo` are decoded again below
        result.forced[i], result.generated[i] = forced, generated
    _decode_batches(subject, queries, prompt_ids, drafts, s, progress, desc, give_up, todo, result, resume)
    return result


def _decode_batches(subject: Subject, queries, prompt_ids, drafts, s: DecodeSettings, progress: bool, desc: str,
                    give_up: GiveUp | None, batches: list[list[int]], result: Decoded,
                    resume: Checkpoint | None) -> None:
    """Decode `batches` into `result` (and `resume`), one subject batch context each."""
    tok = subject.tokenizer
    stops, pad = set(s.stops) if s.stops is not None else stop_tokens(tok), tok.pad_token_id
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        start = time.perf_counter()
        row_gives_up = None
        if give_up is not None:
            def row_gives_up(r, tokens, idx=idx):  # batch row r is query idx[r]
                return give_up(idx[r], tokens)
        prompts = [prompt_ids[i] for i in idx]
        with subject.batch_context([queries[i] for i in idx]) as select_rows:
            prefix = _shared_prefix(subject, prompts)
            out = decode(subject.model, [p[prefix[1]:] for p in prompts] if prefix else prompts,
                         [drafts[i] for i in idx], s.max_new_tokens, stops, pad, select_rows, row_gives_up, prefix)
        for k, i in enumerate(idx):
            result.forced[i], result.generated[i] = out.forced[k], out.generated[k]
        result.forward_s += out.forward_s
        result.steps_s += out.steps_s
        if resume:
            resume.add(desc, idx, out, time.perf_counter() - start)


MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth a forward pass of its own


def _shared_prefix(subject: Subject, prompts: list[list[int]]) -> tuple | None:
    """(its cache, its length) of the leading tokens every prompt of a batch shares and the subject runs
    alike for every row (a chat template's opening), run once instead of once per row; None if there
    is none worth it."""
    n = subject.shared_prefix(prompts) if len(prompts) > 1 and hasattr(subject, "shared_prefix") else 0
    if n < MIN_SHARED_PREFIX:
        return None
    with subject.prefix_context(), torch.inference_mode():
        cache = prefix_cache(subject.model, prompts[0][:n])
    return None if cache is None else (cache, n)


def _decode_in_parts(subject: Subject, queries, prompt_ids, drafts, s: DecodeSettings, progress: bool, desc: str,
                     give_up: GiveUp | None, resume: Checkpoint | None, todo: list[list[int]],
                     result: Decoded) -> dict:
    """The batches `todo` dealt round-robin to `s.processes` forked parts, or to the ranks of a
    torch.distributed group, each saving what it finishes to a part file beside the checkpoint (a
    temporary folder without one, forked parts only); returns every finished row, all parts' work
    taken into `resume` (by rank 0, the others read it) and their times into `result`."""
    rank, world = ranks()
    if world > 1 and resume is None:
        raise ConfigError("decoding in a torch.distributed group needs a checkpoint every rank shares")
    with tempfile.TemporaryDirectory(prefix="megedit-eval-") as scratch:
        into = resume or Checkpoint(Path(scratch) / "eval.json", "parts of one call")

        def work(k: int, n: int) -> None:
            part = Checkpoint(Checkpoint.part_path(into.path, k), into.key, parts=False)
            _decode_batches(subject, queries, prompt_ids, drafts, s, progress and k == 0, desc, give_up, todo[k::n],
                            Decoded([None] * len(queries), [None] * len(queries)), part)
            part.save()

        try:
            run_parts(work, s.processes, f"evaluation ({desc})", rerun="the batches saved" if resume else "")
        finally:  # what the parts finished, a stopped one's too, goes into the checkpoint
            if rank == 0:
                times = into.absorb_parts()
                result.forward_s += times.get("forward_s", 0.0)
                result.steps_s += times.get("steps_s", 0.0)
        barrier()
        if rank != 0:
            into.reload()
        return into.rows(desc)


def greedy_answers(subject: Subject, prompts: Sequence[str], prompt_ids: Sequence[list[int]], fmt: PromptFormat,
                   max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to raw prompts (their token ids given), each routed on its own text, up to the
    first newline or EOS: decoded exactly as the evaluation harness decodes."""
    queries = [Query("", "generate", p, None) for p in prompts]
    with torch.inference_mode():
        out = run_queries(subject, queries, prompt_ids, [[] for _ in prompts],
                          DecodeSettings(fmt, max_new_tokens, batch_size), progress=False, desc="generating")
    return [subject.tokenizer.decode(g, skip_special_tokens=True).strip() for g in out.generated]
