"""The evaluation harness: the same decoding and scoring for every method (METHOD.md §3).

Each edit contributes its prompt (Reliability), its first rephrase (Generality), its first
locality prompt (Locality) and its specificity prompts (Specificity: the same subject, another
question). Each is scored by greedy generation (AG) and by teacher forcing (TF). Locality and
Specificity are scored against the PRE-edit model's own output, computed once per (model,
queries, format, settings) and cached on disk. Such a query the subject leaves exactly as the
unedited model (MeG: the router turns it away, so the neuron adds 0.0) outputs that reference
whatever it is: it gets full credit and neither it nor its reference is decoded (decoding both
gives the same tokens: checked on 10,000 edits; `decode_unchanged` does it). Chat replies
(eval/chat.py) are scored apart, beside the base model's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Collection, Sequence

from ..data.prompts import DEFAULT_FOR_KIND, PromptFormat, get_format
from ..data.requests import EditRequest
from ..errors import ConfigError
from ..io import atomic_write_json
from ..lm import Decoded
from ..models import cache_root, model_fingerprint
from ..parallel import barrier, check_forkable, ranks
from ..runtime.checkpoint import Checkpoint
from ..runtime.decoding import DecodeSettings, GiveUp, run_queries
from ..runtime.subject import Query, Subject, as_subject
from .metrics import ag_match, could_still_match, first_line, harmonic_mean, normalize_answer, percent, tf_accuracy
from .chat import CHAT_BUDGET, chat_queries, chat_settings, has_chat_template, score_chat
from .report import EvalReport

log = logging.getLogger(__name__)

QUERY_KINDS = ("reliability", "generality", "locality", "specificity")
UNEDITED_KINDS = ("locality", "specificity")  # scored against the pre-edit model's own output
PAPER_KINDS = QUERY_KINDS[:3]  # the paper's six-number Score


def build_queries(requests: Sequence[EditRequest]) -> dict[str, list[Query]]:
    queries: dict[str, list[Query]] = {kind: [] for kind in QUERY_KINDS}
    for r in requests:
        queries["reliability"].append(Query(r.case_id, "reliability", r.prompt, r.target))
        if r.rephrases:
            queries["generality"].append(Query(r.case_id, "generality", r.rephrases[0], r.target))
        if r.locality:
            queries["locality"].append(Query(r.case_id, "locality", r.locality[0].prompt, None))
        queries["specificity"] += [Query(r.case_id, "specificity", p, None) for p in r.specificity]
    return queries


def pre_edit_outputs(subject: Subject, queries: Sequence[Query], prompt_ids, s: DecodeSettings, progress: bool = True,
                     cache_dir: Path | None = None, desc: str = "pre-edit locality") -> tuple[list[list[int]], float]:
    """The unedited model's greedy tokens on each query, cached by the model's fingerprint, the
    prompts and the settings; a killed run resumes from the batches it finished (beside the cache
    file). Also returns the seconds those earlier batches took."""
    with subject.unedited():
        key = hashlib.sha256(json.dumps({
            "model": model_fingerprint(subject.model, progress), "prompts": prompt_ids,
            "format": s.prompt_format.to_dict(), "max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size,
            **({"stops": list(s.stops)} if s.stops is not None else {}),
        }).encode()).hexdigest()[:24]
        path = (cache_dir or cache_root()) / "locality-references" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())["tokens"], 0.0
        resume = Checkpoint.shared(path.with_suffix(".partial.json"), key)
        earlier_s = resume.seconds(desc).get("seconds", 0.0)  # batches a killed run finished
        tokens = run_queries(subject, queries, prompt_ids, [[] for _ in queries], s, progress, desc,
                             resume=resume).generated
    atomic_write_json(path, {"tokens": tokens})
    resume.remove()
    return tokens, earlier_s


# queries decoded together: 128 decodes 17% faster than 64 on this project's 2-core CPU, the same tokens
EVAL_BATCH_SIZE = 128
DEFAULT_ANSWER_TOKENS = 20  # the harness's budget (METHOD.md), raised to the longest target when that is longer


def _answer_budget(queries: Sequence[Query], fmt, tok, max_new_tokens: int | None) -> int:
    """The answer token budget. A budget given shorter than a target is refused: its answer could
    never be produced in full. None: DEFAULT_ANSWER_TOKENS, or the longest target's length."""
    lengths = [len(fmt.answer_ids(q.target, tok)) for q in queries]
    longest = max(lengths, default=0)
    if max_new_tokens is None:
        return max(DEFAULT_ANSWER_TOKENS, longest)
    if longest > max_new_tokens:
        q = queries[lengths.index(longest)]
        raise ConfigError(f"max_new_tokens {max_new_tokens} is shorter than the target of edit {q.case_id} "
                          f"({longest} tokens, {q.target!r}): raise it to at least the longest target")
    return max_new_tokens


def evaluate(subject, requests: Sequence[EditRequest], *, prompt_format: str | PromptFormat | None = None,
             data_kind: str | None = None, data_name: str | None = None, max_new_tokens: int | None = None,
             batch_size: int = EVAL_BATCH_SIZE, progress: bool = True, cache_dir: Path | None = None,
             checkpoint: str | Path | None = None, processes: int = 1, decode_unchanged: bool = False,
             chat_edits: int | None = 256) -> EvalReport:
    """Score `subject` (a Subject or a `(model, tokenizer)` pair) on `requests`.

    The prompt format defaults to the data kind's (raw cloze for CounterFact, the short-answer
    template for ZsRE). Returns an EvalReport with metrics in percent and one row per query.
    `max_new_tokens`: the answer budget (None: 20, or the longest target's tokens when longer).
    Requests with `specificity` prompts add that query kind (data/specificity.py builds them from
    a pool); `chat_edits`: the prompt and first rephrase of that many edits (None: all, 0: none)
    are also asked as chats (eval/chat.py), when the tokenizer has a chat template.
    `checkpoint`: a file for the finished batches, so that a killed evaluation of the same
    subject resumes (the times reported then include the killed run's batches); it is removed
    when the evaluation completes. A MeG subject's key holds its settings, not its generator's
    weights: give each edited model its own checkpoint file. `processes` > 1 (CPU, Linux): the
    batches are shared among that many forked processes (megedit.parallel), the same scores.
    `decode_unchanged`: decode the queries the subject says it leaves unchanged too, not only
    those it changes (slower; the same scores, which is what it checks).
    """
    subject = as_subject(subject)
    check_forkable(subject.model, processes)
    tok = subject.tokenizer
    fmt = get_format(prompt_format or DEFAULT_FOR_KIND.get(data_kind or "", "raw"))
    queries = build_queries(requests)
    s = DecodeSettings(fmt, _answer_budget(queries["reliability"], fmt, tok, max_new_tokens), batch_size, processes,
                       decode_unchanged)
    chats = chat_queries(requests, chat_edits) if chat_edits != 0 and has_chat_template(tok) else []
    prompts = {k: [fmt.prompt_ids(q.text, tok) for q in qs] for k, qs in queries.items()}
    timing: dict[str, float] = {}
    same, refs = _unedited_references(subject, queries, prompts, s, progress, cache_dir, timing)
    resume = None
    if checkpoint is not None:
        key = _checkpoint_key(subject, queries, prompts, refs, chats, s, progress)
        resume = Checkpoint.shared(Path(checkpoint), key)
    elif ranks()[1] > 1:
        raise ConfigError("evaluate in a torch.distributed group needs a checkpoint path every rank shares "
                          "(megedit eval: --json); the ranks write their parts beside it")

    cases, credits, unchanged = _run_kinds(subject, queries, prompts, refs, same, s, progress, resume, timing)
    chat = {}
    if chats:
        rows, chat = _run_chat(subject, chats, s, progress, cache_dir, resume, timing)
        cases.extend(rows)

    if resume:
        barrier()  # every rank is done with it
        if ranks()[0] == 0:
            resume.remove()
    timing["total_s"] = sum(v for k, v in timing.items() if k.endswith("_s") and k not in _INNER_TIMES)
    protocol = _protocol(fmt, s, {**queries, "chat": chats}, credits)
    protocol["counts"]["locality_unchanged"] = unchanged
    return _report(subject, data_name or data_kind or "custom", len(requests), protocol, credits, chat, timing, cases)


def _report(subject, data: str, n: int, protocol: dict, credits: dict, chat: dict, timing: dict,
            cases: list) -> EvalReport:
    """The report of an evaluation: its metrics, the paper's Score over Rel/Gen/Loc and the Score over all."""
    paper = [v for k in PAPER_KINDS if k in credits for v in credits[k].values()]
    every = [v for m in credits.values() for v in m.values()]
    return EvalReport(
        method=subject.method,
        model=getattr(subject.model, "megedit_source", None) or subject.model.config._name_or_path,
        data=data,
        n=n,
        protocol=protocol,
        metrics=credits,
        score=harmonic_mean(paper) if paper else float("nan"),
        score_all=harmonic_mean(every) if "specificity" in credits else None,
        chat=chat,
        timing=timing,
        cases=cases,
        edit=subject.describe(),
    )


def _run_kinds(subject, queries: dict, prompts: dict, refs: dict, same: dict, s: DecodeSettings, progress: bool,
               resume: "Checkpoint | None", timing: dict) -> tuple[list[dict], dict, int]:
    """Every query kind's scored rows, its AG / TF credits, and how many locality queries were unchanged."""
    cases, credits, unchanged = [], {}, 0
    for kind, qs in queries.items():
        if qs:
            rows, kept = _run_kind(subject, kind, qs, prompts[kind], refs.get(kind), same.get(kind, [False] * len(qs)),
                                   s, progress, resume, timing)
            unchanged += kept if kind == "locality" else 0
            credits[kind] = _credits(rows)
            cases.extend(rows)
    return cases, credits, unchanged


def _credits(rows: Sequence[dict]) -> dict[str, float]:
    return {"ag": percent([r["ag"] for r in rows]), "tf": percent([r["tf"] for r in rows])}


def case_scores(cases: Sequence[dict], case_ids: Collection[str] | None = None) -> dict:
    """The metrics and the paper's Score of a report's rows (`EvalReport.cases`), of the edits `case_ids`
    only (every edit without): the harness's own sums over those edits' rows."""
    kinds: dict[str, list[dict]] = {}
    for row in cases:
        if row["kind"] in QUERY_KINDS and (case_ids is None or row["case_id"] in case_ids):
            kinds.setdefault(row["kind"], []).append(row)
    credits = {kind: _credits(rows) for kind, rows in kinds.items()}
    paper = [v for k in PAPER_KINDS if k in credits for v in credits[k].values()]
    return {"n": len({r["case_id"] for rows in kinds.values() for r in rows}), "metrics": credits,
            "score": harmonic_mean(paper) if paper else float("nan")}


_INNER_TIMES = ("forward_pass_s", "decoding_steps_s")  # parts of the query kinds' times, not added to the total


def _reference(subject: Subject, kind: str, qs: Sequence[Query], prompts: list, s: DecodeSettings, progress: bool,
               cache_dir: Path | None, timing: dict) -> list[list[int]]:
    """The pre-edit model's outputs on one unedited kind's queries; its time under `<kind>_reference_s`."""
    start = time.perf_counter()
    tokens, earlier_s = pre_edit_outputs(subject, qs, prompts, s, progress, cache_dir, desc=f"pre-edit {kind}") \
        if qs else ([], 0.0)
    timing[f"{kind}_reference_s"] = time.perf_counter() - start + earlier_s
    return tokens


def _unedited_references(subject: Subject, queries: dict, prompts: dict, s: DecodeSettings, progress: bool,
                         cache_dir: Path | None, timing: dict) -> tuple[dict, dict]:
    """Per unedited kind: which queries the subject leaves unchanged, and the pre-edit outputs of the
    others (None for an unchanged one: its credit is full whatever the reference, so it is not decoded)."""
    same, refs = {}, {}
    for kind in UNEDITED_KINDS:
        start = time.perf_counter()
        same[kind] = _unchanged(subject, queries[kind], s)
        timing[f"{kind}_s"] = time.perf_counter() - start  # the kind's time: routing, then decoding (_run_kind)
        todo = [i for i, u in enumerate(same[kind]) if not u]
        tokens = _reference(subject, kind, [queries[kind][i] for i in todo], [prompts[kind][i] for i in todo], s,
                            progress, cache_dir, timing)
        refs[kind] = [None] * len(same[kind])
        for k, i in enumerate(todo):
            refs[kind][i] = tokens[k]
    return same, refs


def _run_chat(subject: Subject, queries: Sequence[Query], s: DecodeSettings, progress: bool, cache_dir: Path | None,
              resume: "Checkpoint | None", timing: dict) -> tuple[list[dict], dict]:
    """The chat replies of the edited and the unedited model (the latter cached on disk), scored."""
    s = chat_settings(s, subject)
    ids = [s.prompt_format.prompt_ids(q.text, subject.tokenizer) for q in queries]
    base = _reference(subject, "chat", queries, ids, s, progress, cache_dir, timing)
    start = time.perf_counter()
    todo = [i for i, same in enumerate(_unchanged(subject, queries, s)) if not same]
    out = run_queries(subject, [queries[i] for i in todo], [ids[i] for i in todo], [[] for _ in todo], s, progress,
                      "chat", resume=resume)
    edited = list(base)  # an unchanged chat's reply is the base model's
    for k, i in enumerate(todo):
        edited[i] = out.generated[k]
    timing["chat_s"] = time.perf_counter() - start
    if resume:
        resume.save()
    rows, rates = score_chat(queries, edited, base, subject.tokenizer, s.stops)
    return rows, {"n": len(queries), "budget": s.max_new_tokens, "unchanged": len(queries) - len(todo), **rates}


def _run_kind(subject, kind: str, qs: Sequence[Query], prompts: list, ref_tokens, same: list[bool],
              s: DecodeSettings, progress: bool, resume: "Checkpoint | None", timing: dict) -> tuple[list[dict], int]:
    """The scored rows of one query kind and how many of them the subject left unchanged (`same`: full
    credit, not decoded); its times added to `timing` (a killed run's batches included)."""
    todo = [i for i, u in enumerate(same) if not u]
    expected, drafts, goals = _answers_sought(kind, [qs[i] for i in todo], [ref_tokens[i] for i in todo]
                                              if ref_tokens is not None else None, s.prompt_format, subject.tokenizer)
    start = time.perf_counter()
    earlier = resume.seconds(kind) if resume else {}  # batches a killed run finished
    out = run_queries(subject, [qs[i] for i in todo], [prompts[i] for i in todo], drafts, s, progress, kind,
                      _give_up_on(goals, subject.tokenizer), resume)
    timing[f"{kind}_s"] = timing.get(f"{kind}_s", 0.0) + time.perf_counter() - start + earlier.get("seconds", 0.0)
    timing["forward_pass_s"] = timing.get("forward_pass_s", 0.0) + out.forward_s + earlier.get("forward_s", 0.0)
    timing["decoding_steps_s"] = timing.get("decoding_steps_s", 0.0) + out.steps_s + earlier.get("steps_s", 0.0)
    if resume:
        resume.save()
    rows = iter(_score(kind, [qs[i] for i in todo], out, expected, subject.tokenizer))
    return [next(rows) if not u else _unchanged_row(q) for q, u in zip(qs, same)], len(qs) - len(todo)


def _unchanged_row(q: Query) -> dict:
    """The row of a query the subject leaves exactly as the unedited model: its output is the reference, so
    both credits are full; neither text was decoded."""
    return {"case_id": q.case_id, "kind": q.kind, "query": q.text, "expected": None, "got": None, "ag": True, "tf": 1.0}


def _unchanged(subject: Subject, qs: Sequence[Query], s: DecodeSettings) -> list[bool]:
    """Which queries the subject leaves exactly as the unedited model, asked a batch at a time
    (all False with `s.decode_unchanged`)."""
    if s.decode_unchanged:
        return [False] * len(qs)
    return [u for i in range(0, len(qs), s.batch_size) for u in subject.unchanged(qs[i : i + s.batch_size])]


def _checkpoint_key(subject, queries: dict, prompts: dict, refs: dict, chats: list, s: DecodeSettings,
                    progress: bool) -> str:
    """What a resumable evaluation depends on: the subject (method, settings, weights), every query and setting."""
    return hashlib.sha256(json.dumps({
        "method": subject.method, "edit": subject.describe(), "model": model_fingerprint(subject.model, progress),
        "prompts": prompts, "targets": [q.target for q in queries["reliability"]], "reference": refs,
        "chat": [q.text for q in chats],
        "format": s.prompt_format.to_dict(), "max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size,
        "decoded": "changed locality queries" if not s.decode_unchanged else "all",  # the rows' numbering
    }, sort_keys=True, default=str).encode()).hexdigest()


def _answers_sought(kind: str, qs: Sequence[Query], ref_tokens, fmt: PromptFormat, tok):
    """(expected tokens, teacher-forcing drafts, AG goal texts) of one query kind: the target for
    reliability and generality (its draft ends with the stop token), the pre-edit model's own
    output for locality."""
    if kind in UNEDITED_KINDS:
        return ref_tokens, ref_tokens, [tok.decode(t, skip_special_tokens=True) for t in ref_tokens]
    expected = [fmt.answer_ids(q.target, tok) for q in qs]
    return expected, [e + [fmt.stop_token(tok)] for e in expected], [q.target for q in qs]


def _give_up_on(goals: Sequence[str], tok) -> GiveUp:
    """The early stop: query i stops decoding once its output can no longer match `goals[i]`
    (its AG credit is then decided; the output is kept up to there)."""
    def give_up(i: int, tokens: list[int]) -> bool:
        return not could_still_match(tok.decode(tokens, skip_special_tokens=True), goals[i])

    return give_up


def _protocol(fmt: PromptFormat, s: DecodeSettings, queries: dict, credits: dict) -> dict:
    """Exactly how the numbers of a report were computed."""
    protocol = {
        "name": "megedit-ag-tf-v2",
        "prompt_format": fmt.to_dict(),
        "ag": f"greedy, at most {s.max_new_tokens} new tokens, stop at newline or EOS; exact match after "
              "strip/lowercase/trailing-dot removal; locality and specificity: equal to the pre-edit model's output",
        "tf": "teacher-forced argmax accuracy over the target tokens; locality and specificity: over the pre-edit "
              "model's greedy output tokens (its end-of-answer token included when it produced one)",
        "queries": "first rephrase and first locality prompt of each edit, every specificity prompt",
        "unchanged": "all queries decoded" if s.decode_unchanged else
                     "a locality or specificity query the subject leaves exactly as the unedited model (MeG: router "
                     "off, the neuron adds 0.0; weight edits: none) outputs the pre-edit output: full AG and TF credit, "
                     "neither decoded (texts null in the cases); counts.locality_unchanged of the locality queries; an "
                     "unchanged chat query is given the pre-edit reply",
        "early_stop": "a query's decoding stops once its output can no longer match (same AG credit); "
                      "'got' in the cases shows the output up to that point",
        "score": "harmonic mean of the six Rel/Gen/Loc numbers (the paper's)",
        "batch_size": s.batch_size,
        "counts": {k: len(v) for k, v in queries.items()},
    }
    if "specificity" in credits:
        protocol["score_all"] = f"harmonic mean of all {2 * len(credits)} numbers, specificity included"
    if queries.get("chat"):
        protocol["chat"] = (f"the first edits' prompt and first rephrase as one-turn chats (chat template), greedy, at "
                            f"most {CHAT_BUDGET} new tokens, stop at end-of-turn; rates: reply holds the target (whole "
                            "words, any case), ends with end-of-turn, is degenerate (1-8 words thrice in a row, or a "
                            "line thrice); the unedited model's beside them")
    return protocol


def _score(kind: str, qs: Sequence[Query], out: Decoded, expected: list[list[int]], tok) -> list[dict]:
    rows = []
    for i, q in enumerate(qs):
        got = first_line(tok.decode(out.generated[i], skip_special_tokens=True))
        forced = out.forced[i][: len(expected[i])]
        if kind in UNEDITED_KINDS:
            want = first_line(tok.decode(expected[i], skip_special_tokens=True))
            ag = normalize_answer(got) == normalize_answer(want)
        else:
            want = q.target
            ag = ag_match(got, want)
        rows.append({"case_id": q.case_id, "kind": kind, "query": q.text, "expected": want.strip(),
                     "got": got.strip(), "ag": ag, "tf": round(tf_accuracy(forced, expected[i]), 4)})
    return rows
