"""The stage A levers behind answers that end and chat replies that hold (docs/method.md): each
part fits stage A on the first CounterFact (or bench/meg.py set) edits and applies the fitted
vectors directly, no routing. bench/real_use_levers.py runs them (parts answers, costs,
chat-answer) and writes their rows into its result file; its docstring says what each measures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from typing import Sequence

from real_use_levers import SHARED, WORK

ANSWERS = [("newline", False), ("newline", True), ("eos", False), ("eos", True)]  # (answer end, chat wording)
# (label, FitConfig overrides): what the chat wording costs in stage A with its other wordings, and cheaper forms
COSTS = [("no chat wording", {"chat_wording": False}), ("defaults", {}),
         ("chat wording with an empty system message", {"chat_system": ""}),
         ("chat margin 0.5", {"chat_margin": 0.5}), ("2 paraphrases", {"paraphrases": 2}),
         ("2 paraphrases, empty system message", {"paraphrases": 2, "chat_system": ""})]


@contextmanager
def fitted_vectors(model, tokenizer, fit, table: dict):
    """The model with stage A's vectors applied to the queries `table` maps to them (by text)."""
    from megedit.runtime.subject import vector_table_subject

    subject = vector_table_subject(model, tokenizer, fit.spec, table, lambda q: q.text, "stage A vectors")
    try:
        yield subject
    finally:
        subject.neuron.detach()


def _evaluate(subject, scored, fmt):
    from megedit.eval import evaluate

    return evaluate(subject, scored, prompt_format=fmt, progress=False, chat_edits=None, cache_dir=WORK)


def answer_rates(model, tokenizer, n: int) -> list[dict]:
    """What an answer ends with and the chat wording, on the first `n` CounterFact edits' prompts alone:
    stage A's cost and the fitted vectors' chat and free-generation rates."""
    from megedit import load_requests
    from megedit.data.prompts import get_format
    from megedit.stages.fit_neurons import FitConfig, fit_neurons

    edits = load_requests("counterfact", SHARED / "counterfact-edit.json", limit=n)
    scored = [dataclasses.replace(r, rephrases=(), locality=()) for r in edits]
    rows, base = [], None
    for stop, chat in ANSWERS:
        fmt = dataclasses.replace(get_format("raw"), stop=stop)
        start = time.perf_counter()
        fit = fit_neurons(model, tokenizer, edits, fmt, FitConfig(layer=24, paraphrases=0, chat_wording=chat),
                          progress=False, work_dir=WORK / "fit-shards")
        fit_s = time.perf_counter() - start
        with fitted_vectors(model, tokenizer, fit, dict(zip((r.prompt for r in edits), fit.vectors))) as subject:
            report = _evaluate(subject, scored, fmt)
            free = free_generation(subject, edits, 50)
        base = base or {"chat": report.chat["base"]}
        summary = fit.summary()
        row = {"stop": stop, "chat_wording": chat, "fit_s": fit_s, "success_rate": summary["success_rate"],
               "median_steps": summary["median_steps"], "rel_ag": report.metrics["reliability"]["ag"],
               "chat": report.chat["edited"], "free_generation_degenerate": free}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows + [{"stop": "base model", **base}]


def stage_a_rates(model, tokenizer, edits, pool, overrides: dict) -> dict:
    """Stage A as MeGEditor runs it (layer 24, `overrides` on the default FitConfig) on `edits`, its
    vectors applied to their own prompts and rephrases: cost, RelAG, GenAG and the chat rates, with
    how many edited replies are the target alone and how many hold it after other words."""
    from megedit import MeGConfig, MeGEditor
    from megedit.data.prompts import get_format
    from megedit.eval.chat import holds_target
    from megedit.stages.fit_neurons import fit_neurons

    config = MeGConfig()
    config.fit = dataclasses.replace(config.fit, layer=24, **overrides)
    editor = MeGEditor(model, tokenizer, config, progress=False)
    start = time.perf_counter()
    variants = editor.variants(edits, pool)[0]
    fit = fit_neurons(model, tokenizer, edits, get_format("raw"), config.fit, progress=False, variants=variants)
    fit_s = time.perf_counter() - start
    table = {text: v for r, v in zip(edits, fit.vectors) for text in (r.prompt, *r.rephrases)}
    with fitted_vectors(model, tokenizer, fit, table) as subject:
        report = _evaluate(subject, [dataclasses.replace(r, locality=()) for r in edits], get_format("raw"))
    chats = [c for c in report.cases if c["kind"] == "chat"]
    alone = [c["got"].rstrip(" .!").lower() == c["expected"].strip().lower() for c in chats]
    after = [holds_target(c["got"], c["expected"]) and not c["got"].lower().startswith(c["expected"].strip().lower())
             for c in chats]
    summary = fit.summary()
    return {"overrides": overrides, "fit_s": fit_s, "success_rate": summary["success_rate"],
            "median_steps": summary["median_steps"], "rel_ag": report.metrics["reliability"]["ag"],
            "gen_ag": report.metrics["generality"]["ag"], "chat": report.chat["edited"],
            "chat_base": report.chat["base"], "chat_target_alone": 100.0 * sum(alone) / len(chats),
            "chat_target_after_words": 100.0 * sum(after) / len(chats)}
def answer_costs(model, tokenizer, n: int) -> list[dict]:
    """The COSTS settings of stage A on the first `n` CounterFact edits, with their pool paraphrases."""
    from megedit import load_requests

    pool = load_requests("counterfact", SHARED / "counterfact-train.json")
    edits = load_requests("counterfact", SHARED / "counterfact-edit.json", limit=n)
    rows = []
    for label, overrides in COSTS:
        rows.append({"label": label, **stage_a_rates(model, tokenizer, edits, pool, overrides)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def chat_answer_rates(model, tokenizer, sets: Sequence[str], n: int) -> list[dict]:
    """The chat wording's answer with and without a leading space, on the first `n` edits of bench/meg.py's sets."""
    from meg import SETTINGS

    from megedit import load_requests

    rows = []
    for name in sets:
        kind, edits_path, _, pool_path = SETTINGS[name]
        edits = load_requests(kind, edits_path, limit=n, skip_invalid=True)
        pool = load_requests("counterfact", pool_path)
        for space in (False, True):
            rows.append({"edits": name, "n": len(edits), "chat_answer_space": space,
                         **stage_a_rates(model, tokenizer, edits, pool, {"chat_answer_space": space})})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def free_generation(subject, edits, tokens: int) -> float:
    """Percent of degenerate 50-token greedy continuations of the raw prompts (end-of-turn stops them)."""
    from megedit.eval.chat import is_degenerate
    from megedit.runtime.subject import Query
    from megedit.lm import end_of_turn_ids

    tok, model = subject.tokenizer, subject.model
    ends, loops = end_of_turn_ids(model, tok), []
    for start in range(0, len(edits), 16):
        batch = edits[start : start + 16]
        inputs = tok([r.prompt for r in batch], return_tensors="pt", padding=True)
        with subject.batch_context([Query(r.case_id, "free", r.prompt, r.target) for r in batch]):
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=ends,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, inputs.input_ids.shape[1]:].tolist():
            cut = next((j for j, t in enumerate(row) if t in ends), len(row))
            loops.append(is_degenerate(tok.decode(row[:cut], skip_special_tokens=True)))
    return 100.0 * sum(loops) / len(loops)
