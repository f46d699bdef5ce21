"""The levers behind edits that stay specific and answers that end (docs/method.md), measured
side by side on SmolLM2 and CounterFact, seed 0.

routing (first 256 edits of counterfact-edit.json, pool counterfact-train.json): which queries
fire an edit, under each combination of the tuned encoder's hard negatives, the router's
negatives (other-relation and plain prompts about each edit's subject) and what counts as an
edit's wordings (its prompt, or its prompt and stage A's other wordings). Queries: each edit's
first rephrase (fires its own edit: the ceiling of Generality), 3 specificity probes (must not
fire) and its locality prompt (must not fire). Stages B and C only; no LM decoding.

answers (first 32 edits, stage A on the prompt alone, the fitted vectors applied directly, no
routing): the answer's end token (newline or EOS) and the chat wording (the prompt as a one-turn
chat, fitted with the same vector), against the chat replies' three rates, 50-token free
generation after the raw prompt, RelAG and stage A's cost.

margin (bench/meg.py's edit sets: the first 1,024 edits of each CounterFact file, the other file
the pool; the 998 ZsRE edits, pool counterfact-train.json; their stages B and C, cached by
bench/meg.py): the same three query kinds, with the router's negative margin (a negative holds
a query back only when it is nearer than the query's nearest wording by this much cosine) from
0 to 0.1.

calibration (the same edit sets and stages): epsilon calibrated on a mirror of prompts alone
or of every wording (routing.router.calibration_wordings), each under several weights on false
fire (routing.router.false_fire_weight), and the three query kinds' firing rates under each.

neighbours (the same edit sets and stages): router negatives per edit that ask its relation about
other subjects (pool prompts of its wording's relation; routing.router.same_relation_negatives),
0 to 16, and the three query kinds' firing rates under each.

unknown (the same edit sets and stages): the extra margin of negatives drawn for an edit whose
relation the pool does not know (routing.router.unknown_relation_margin), 0 to 0.1. On the two
CounterFact sets every edit's relation is known, so there the pool is made blind to it: each edit
draws its other-relation negatives as if its relation were unknown (its own relation among them at
times), which is the case the margin is for; on ZsRE, 765 of 998 edits' relations are unknown.

wordings (the same edit sets and stages): an edit's other-relation router negatives, 16 relations or
every other one, 1, 4 or every negative-half wording of each, with an extra margin of 0 to 0.08
(routing.router.negatives, negative_wordings, other_relation_margin); the harness's three query
kinds and bench/subject_probes.py's questions about each edit's subject fire under each.

plain (the same edit sets and stages): the plain negatives' extra margin (routing.router.plain_margin), 0 to
0.05: the harness's three query kinds, every plain prompt about each edit's subject and bench/subject_probes.py's
questions fire under each.

gate (the same edit sets and stages): the question gate's threshold (routing.router.question_gate), off and 0.3
to 0.6: the harness's three query kinds, every plain prompt about each edit's subject, bench/subject_probes.py's
questions and its free-form questions in sentence form (FREE_FORM) fire under each.

misses (the same edit sets and stages): why each edit's first rephrase does not fire its edit: it fires
another edit, lies beyond epsilon, or a negative holds it back (the negative's kind, and whether it was
drawn for this edit or another).

costs (first 64 edits, stage A with its pool paraphrases, the fitted vectors applied directly):
what the chat wording costs beside the other wordings, and cheaper forms of it (an empty system
message: 24 tokens instead of 40 on SmolLM2; a lower chat margin; fewer paraphrases), against
RelAG, GenAG and the chat rates (chats always in the template's default form).

chat-answer (first 128 edits of bench/meg.py's sets, stage A as in costs): the chat wording's answer as
the bare target ("Vancouver", tokens V|ancouver) or after a space like every other wording's
(" Vancouver", one token): the chat rates, and how many replies are the target alone or hold it after
other words ("V Vancouver").

    OMP_NUM_THREADS=2 .venv/bin/python bench/real_use_levers.py [routing] [answers] [costs] [margin[=SET,...]]
        [calibration] [neighbours] [unknown] [wordings[=SET,...]] [plain] [gate] [misses] [chat-answer]

Result: bench/results/real-use-levers.json; caches in bench/results/cases/real-use-levers/. The stage A
parts (answers, costs, chat-answer) are in bench/answer_levers.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data/counterfact"
WORK = HERE / "results" / "cases" / "real-use-levers"
OUT = HERE / "results" / "real-use-levers.json"
# (label, encoder hard negatives, router negatives, plain negatives, the router knows the other wordings)
ROUTING = [("before: no negatives", 0, 0, 0, False), ("router negatives, plain encoder", 0, 16, 2, False),
           ("+ hard-negative encoder", 2, 16, 2, False), ("+ other wordings (defaults)", 2, 16, 2, True),
           ("defaults, 4 negatives", 2, 4, 2, True), ("defaults, 8 negatives", 2, 8, 2, True),
           ("defaults, 32 negatives", 2, 32, 2, True), ("defaults, no plain negatives", 2, 16, 0, True)]
# the router's negative margin, on the edit sets of bench/meg.py (their stages B and C, cached there)
MARGINS = (0.0, 0.02, 0.05, 0.1)
MARGIN_SETS = ("counterfact", "counterfact-swap", "zsre")
# calibration: epsilon maximises recall - weight x false fire on the mirror's curve
FALSE_FIRE_WEIGHTS = (1.0, 0.75, 0.5, 0.35, 0.25)
# neighbours: router negatives per edit that ask its relation about other subjects
SAME_RELATION_NEGATIVES = (0, 2, 4, 8, 16)
# unknown: the extra margin of the negatives of an edit whose relation the pool does not know
UNKNOWN_RELATION_MARGINS = (0.0, 0.02, 0.035, 0.05, 0.075, 0.1)
# wordings: (other relations per edit, wordings per relation, their margin); None: every one
NEGATIVE_WORDINGS = [(16, 1, 0.0), (None, 1, 0.0), (None, 4, 0.0), (None, 4, 0.05), (None, None, 0.0),
                     (None, None, 0.02), (None, None, 0.05), (None, None, 0.08)]
# plain: the extra margin of the plain negatives ("Tell me about X."), which terse questions lie near
PLAIN_MARGINS = (0.0, 0.02, 0.035, 0.05)
# (question_gate, question_gate_lone)
GATE_SETTINGS = ((None, None), (0.3, 0.3), (0.35, 0.35), (0.4, 0.4), (0.5, 0.5), (0.4, 0.3), (0.4, 0.25), (0.4, 0.2))
NEGATIVE_KINDS = {"other": "other-relation", "plain": "plain", "same": "same-relation"}  # negative_groups' kinds


def routing_rates(model, tokenizer, n: int) -> list[dict]:
    from megedit import MeGConfig, MeGEditor, load_requests
    from megedit.data.specificity import with_specificity

    pool = load_requests("counterfact", SHARED / "counterfact-train.json")
    edits = with_specificity(load_requests("counterfact", SHARED / "counterfact-edit.json", limit=n), pool, 3)
    queries = probe_queries(edits)
    rows = []
    for label, hard, negatives, plain, wordings in ROUTING:
        config = MeGConfig()
        config.routing.encoder.hard_negatives = hard
        config.routing.router.negatives, config.routing.router.plain_negatives = negatives, plain
        editor = MeGEditor(model, tokenizer, config, progress=False)
        variants = editor.variants(edits, pool)[0] if wordings else [() for _ in edits]
        routing = editor.stage_bc(edits, pool, WORK, variants)[0]
        row = {"label": label, "hard_negatives": hard, "negatives": negatives, "plain_negatives": plain,
               "wordings": wordings, "epsilon": routing["router"].epsilon}
        row |= fire_rates(routing["encoder"], routing["router"], queries)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def probe_queries(edits) -> dict[str, list[tuple[str, int]]]:
    """Per kind, (query, its edit's row): each edit's first rephrase, specificity probes and first locality prompt."""
    return {"rephrase": [(r.rephrases[0], k) for k, r in enumerate(edits)],
            "specificity": [(p, k) for k, r in enumerate(edits) for p in r.specificity],
            "locality": [(r.locality[0].prompt, k) for k, r in enumerate(edits)]}


def blind_view(wordings):
    """The pool's relation wordings knowing no edit's relation: each edit's negatives may then ask its own."""
    from megedit.data.specificity import RelationWordings

    class Blind(RelationWordings):
        def of(self, request):
            return set()

    return Blind(**vars(wordings))


def subject_queries(edits, wordings) -> dict[str, list[tuple[str, int]]]:
    """`probe_queries` and, per edit with a subject, every plain prompt about it, bench/subject_probes.py's
    questions (edits of the asked relation left out) and its free-form questions."""
    from subject_probes import FREE_FORM, QUESTIONS, asks_it

    from megedit.data.specificity import PLAIN_SUBJECT_PROMPTS

    about = [(k, r.subject) for k, r in enumerate(edits) if r.subject]
    return probe_queries(edits) | {
        "plain": [(p.format(s), k) for p in PLAIN_SUBJECT_PROMPTS for k, s in about],
        "questions": [(q.format(r.subject), k) for q, w in QUESTIONS if w is not None
                      for k, r in enumerate(edits) if r.subject and not asks_it(w, wordings)(r)],
        "free_form": [(q.format(s), k) for q in FREE_FORM for k, s in about]}


def fire_rates(encoder, router, queries: dict) -> dict:
    """Per kind: how many queries fire an edit, and fire their own edit (percent)."""
    return embedded_fire_rates(router, embed_queries(encoder, queries))


def embed_queries(encoder, queries: dict) -> dict:
    """Per kind, (the queries' embeddings, their edits' rows)."""
    return {kind: (encoder.encode([text for text, _ in pairs]), torch.tensor([k for _, k in pairs]))
            for kind, pairs in queries.items()}


def embedded_fire_rates(router, embedded: dict) -> dict:
    rates = {}
    for kind, (emb, owners) in embedded.items():
        fired = router.familiar(emb)
        own = torch.tensor(router.nearest_edit(emb)) == owners
        rates[kind] = {"n": len(owners), "fires": 100.0 * float(fired.float().mean()),
                       "fires_own_edit": 100.0 * float((fired & own).float().mean())}
    return rates


def meg_set_routing(model, tokenizer, name: str, config) -> tuple[list, dict]:
    """One of bench/meg.py's edit sets (with 3 specificity probes per edit) and its stages B and C
    under `config` (a MeGConfig), cached where bench/meg.py caches that set's stages."""
    from meg import SETTINGS

    from megedit import MeGEditor, load_requests
    from megedit.data.specificity import with_specificity

    kind, edits_path, n, pool_path = SETTINGS[name]
    pool = load_requests("counterfact", pool_path)
    edits = with_specificity(load_requests(kind, edits_path, limit=n, skip_invalid=True), pool, 3)
    editor = MeGEditor(model, tokenizer, config, progress=False)
    routing = editor.stage_bc(edits, pool, HERE / "results" / "cases" / f"meg-{name}", editor.variants(edits, pool)[0])[0]
    return edits, routing


def meg_set_stage_c(model, tokenizer, name: str) -> tuple:
    """(the defaults' MeGConfig, the edits, their stages B and C, stage C's pool) of one of bench/meg.py's sets."""
    from meg import SETTINGS

    from megedit import MeGConfig, load_requests
    from megedit.stages.routing import split_for_edits

    config = MeGConfig()
    edits, routing = meg_set_routing(model, tokenizer, name, config)
    pool = load_requests("counterfact", SETTINGS[name][3])
    return config, edits, routing, [*sum(split_for_edits(edits, pool, config.routing), [])]


def margin_rates(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """The router's negative margin on bench/meg.py's edit sets, with their stages B and C (the defaults)."""
    from megedit import MeGConfig

    rows = []
    for name in sets:
        edits, routing = meg_set_routing(model, tokenizer, name, MeGConfig())
        for margin in MARGINS:
            router = dataclasses.replace(routing["router"], config=dataclasses.replace(
                routing["router"].config, negative_margin=margin))
            row = {"edits": name, "n_edits": len(edits), "negative_margin": margin, "epsilon": router.epsilon,
                   **fire_rates(routing["encoder"], router, probe_queries(edits))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def calibration_rates(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """Epsilon calibrated on a mirror of prompts alone or of every wording, under each weight on false
    fire, on bench/meg.py's edit sets: the epsilon chosen from the mirror's curve and the deployed
    router's firing rates at it."""
    from megedit import MeGConfig
    from megedit.stages.router import choose_epsilon

    rows = []
    for name in sets:
        for wordings in (False, True):
            config = MeGConfig()
            config.routing.router.calibration_wordings = wordings
            edits, routing = meg_set_routing(model, tokenizer, name, config)
            calibration = routing["router"].record["calibration"]
            for weight in FALSE_FIRE_WEIGHTS:
                chosen = choose_epsilon(calibration["curve"], calibration["max_false_fire"], weight)
                router = dataclasses.replace(routing["router"], epsilon=chosen["epsilon"])
                row = {"edits": name, "n_edits": len(edits), "calibration_wordings": wordings,
                       "false_fire_weight": weight, "epsilon": chosen["epsilon"],
                       "calibration_recall": chosen["recall"], "calibration_false_fire": chosen["false_fire"],
                       **fire_rates(routing["encoder"], router, probe_queries(edits))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def neighbour_rates(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """Router negatives that ask an edit's relation about other subjects (pool prompts), per edit, on
    bench/meg.py's edit sets with their default stages B and C (epsilon as calibrated there)."""
    from meg import SETTINGS

    from megedit import MeGConfig, load_requests
    from megedit.stages.routing import edit_negatives

    rows = []
    for name in sets:
        edits, routing = meg_set_routing(model, tokenizer, name, MeGConfig())
        pool = load_requests("counterfact", SETTINGS[name][3])
        base, encoder = dataclasses.replace(routing["router"], negatives=None), routing["encoder"]
        for k in SAME_RELATION_NEGATIVES:
            config = MeGConfig()
            config.routing.router.same_relation_negatives = k
            negatives, margins = edit_negatives(edits, pool, config.routing)
            router = base.with_negatives(encoder.encode(negatives), margins=margins)
            row = {"edits": name, "n_edits": len(edits), "same_relation_negatives": k, "n_negatives": len(negatives),
                   "epsilon": router.epsilon, **fire_rates(encoder, router, probe_queries(edits))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def unknown_relation_rates(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """The unknown-relation margin on bench/meg.py's edit sets, their stages B and C (epsilon as
    calibrated there); on a set whose edits' relations the pool knows, the pool is made blind to them."""
    from meg import SETTINGS

    from megedit import MeGConfig, load_requests
    from megedit.data.specificity import negative_prompts, relation_wordings
    from megedit.stages.routing import edit_negatives

    rows = []
    for name in sets:
        config = MeGConfig()  # epsilon is calibrated before the negatives join, so it holds for every margin
        edits, routing = meg_set_routing(model, tokenizer, name, config)
        pool = load_requests("counterfact", SETTINGS[name][3])
        base, encoder = dataclasses.replace(routing["router"], negatives=None), routing["encoder"]
        router = config.routing.router
        # a margin of 1 marks the negatives drawn only for edits of unknown relation
        texts, unknown = edit_negatives(edits, pool, dataclasses.replace(config.routing, router=dataclasses.replace(
            router, unknown_relation_margin=1.0)))
        blind = not bool(unknown.any())
        if blind:
            per_edit = negative_prompts(edits, pool, router.negatives, router.plain_negatives, config.routing.seed,
                                        0, blind_view(relation_wordings(pool)))
            texts = list(dict.fromkeys(p for prompts in per_edit for p in prompts))
            unknown = torch.ones(len(texts))
        embedded = encoder.encode(texts)
        for margin in UNKNOWN_RELATION_MARGINS:
            routed = base.with_negatives(embedded, margins=unknown * margin)
            row = {"edits": name, "n_edits": len(edits), "pool_blind": blind, "unknown_relation_margin": margin,
                   "n_unknown_relation_negatives": int(unknown.sum()), "epsilon": routed.epsilon,
                   **fire_rates(encoder, routed, probe_queries(edits))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def wording_rates(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """An edit's other-relation negatives (how many relations, wordings and their margin) on bench/meg.py's edit
    sets with their default stages B and C (epsilon as calibrated there): the harness's query kinds, and
    bench/subject_probes.py's questions about each edit's subject (edits of the relation a question asks left out)."""
    from subject_probes import QUESTIONS, asks_it

    from megedit.data.specificity import relation_wordings, wording_half
    from megedit.stages.routing import edit_negatives

    rows = []
    for name in sets:
        config, edits, routing, pool = meg_set_stage_c(model, tokenizer, name)
        base, encoder = dataclasses.replace(routing["router"], negatives=None), routing["encoder"]
        wordings = relation_wordings(pool)
        queries = probe_queries(edits) | {question: [(question.format(r.subject), k) for k, r in enumerate(edits)
                                                     if not asks_it(wording, wordings)(r)]
                                          for question, wording in QUESTIONS}
        # where each question stands: one of the pool's wordings (and which half) or not
        asked = {q: wording_half(q) if q in wordings.relation else "not in the pool" for q, _ in QUESTIONS}
        embedded = embed_queries(encoder, queries)
        texts = edit_negatives(edits, pool, _negatives(config.routing, None, None, 0.0))[0]  # the widest: all others
        negative = dict(zip(texts, encoder.encode(texts, progress=True)))
        for relations, per_relation, margin in NEGATIVE_WORDINGS:
            texts, margins = edit_negatives(edits, pool, _negatives(config.routing, relations, per_relation, margin))
            router = base.with_negatives(torch.stack([negative[t] for t in texts]), margins=margins)
            row = {"edits": name, "n_edits": len(edits), "relations": relations,
                   "wordings": per_relation, "other_relation_margin": margin, "n_negatives": len(texts),
                   "epsilon": router.epsilon, "questions": asked, **embedded_fire_rates(router, embedded)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def plain_rates(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """The plain negatives' extra margin on bench/meg.py's edit sets with their default stages B and C (epsilon
    as calibrated there): the harness's query kinds, every plain prompt about each edit's subject (4 of the 6
    are not among its negatives) and bench/subject_probes.py's questions."""
    from subject_probes import QUESTIONS, asks_it

    from megedit.data.specificity import PLAIN_SUBJECT_PROMPTS, relation_wordings
    from megedit.stages.routing import edit_negatives

    rows = []
    for name in sets:
        config, edits, routing, pool = meg_set_stage_c(model, tokenizer, name)
        base, encoder, wordings = dataclasses.replace(routing["router"], negatives=None), routing["encoder"], \
            relation_wordings(pool)
        queries = probe_queries(edits) | {
            "plain": [(p.format(r.subject), k) for k, r in enumerate(edits) if r.subject for p in PLAIN_SUBJECT_PROMPTS],
            "questions": [(q.format(r.subject), k) for q, w in QUESTIONS if w is not None
                          for k, r in enumerate(edits) if not asks_it(w, wordings)(r)]}
        embedded = embed_queries(encoder, queries)
        texts = edit_negatives(edits, pool, config.routing)[0]
        negative = encoder.encode(texts, progress=True)
        for margin in PLAIN_MARGINS:
            routing_config = dataclasses.replace(config.routing, router=dataclasses.replace(
                config.routing.router, plain_margin=margin))
            router = base.with_negatives(negative, margins=edit_negatives(edits, pool, routing_config)[1])
            row = {"edits": name, "n_edits": len(edits), "plain_margin": margin, "epsilon": router.epsilon,
                   **embedded_fire_rates(router, embedded)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def gate_rates(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """The question gate's thresholds on bench/meg.py's edit sets with their default stages B and C: per query
    kind, the share that fires an edit and its own edit once the gate has held back what it rejects. Each set
    twice: the edits' own questions as a fit builds them, and blind (the prompt alone for every edit, as for an
    edit whose relation the pool does not know)."""
    from megedit import MeGEditor
    from megedit.data.specificity import relation_wordings
    from megedit.stages.question_gate import QuestionGate

    rows = []
    for name in sets:
        config, edits, routing, pool = meg_set_stage_c(model, tokenizer, name)
        router, encoder, wordings = routing["router"], routing["encoder"], relation_wordings(pool)
        variants = MeGEditor(model, tokenizer, config, progress=False).variants(edits, pool)[0]
        queries = subject_queries(edits, wordings)
        routed = {}  # per kind: which queries fire, whether their nearest edit is their own, and which fire (rows)
        for kind, (emb, owners) in embed_queries(encoder, queries).items():
            near, fired = router.nearest_edit(emb), router.familiar(emb)
            routed[kind] = (fired, torch.tensor([n == int(o) for n, o in zip(near, owners)]), near,
                            fired.nonzero().flatten().tolist())
        for blind in (False, True):
            gate = QuestionGate(encoder, [r.subject for r in edits], [r.prompt for r in edits],
                                [() if blind else v for v in variants], 0.0)
            similarity = {kind: gate.similarity([queries[kind][i][0] for i in at], [near[i] for i in at])
                          for kind, (_, _, near, at) in routed.items()}
            lone_edits = sum(len(gate.masked(k)) == 1 for k in range(len(edits)))
            for threshold, lone in GATE_SETTINGS:
                gate.threshold, gate.lone_threshold = threshold, lone
                row = {"edits": name, "n_edits": len(edits), "blind": blind, "question_gate": threshold,
                       "question_gate_lone": lone, "epsilon": router.epsilon,
                       "lone_edits": lone_edits}
                for kind, (fired, own, near, at) in routed.items():
                    kept = fired.clone()
                    for i, sim in zip(at, similarity[kind]):
                        kept[i] = threshold is None or sim is None or sim >= gate.threshold_of(near[i])
                    row[kind] = {"n": len(kept), "fires": 100.0 * float(kept.float().mean()),
                                 "fires_own_edit": 100.0 * float((kept & own).float().mean())}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def miss_reasons(model, tokenizer, sets: Sequence[str]) -> list[dict]:
    """Why an edit's first rephrase does or does not fire its edit, on bench/meg.py's edit sets with their
    default stages B and C: it fires its own edit or another; it lies beyond epsilon; or a negative holds it
    back, by the negative's kind (other relation, plain, same relation) and whose it is (the edit's own or
    another edit's)."""
    from megedit.data.specificity import negative_groups, relation_wordings
    from megedit.stages.routing import edit_negatives

    rows = []
    for name in sets:
        config, edits, routing, pool = meg_set_stage_c(model, tokenizer, name)
        router, rc = routing["router"], config.routing.router
        texts = edit_negatives(edits, pool, config.routing)[0]  # the router's negatives, in its order
        groups = negative_groups(edits, pool, rc.negatives, rc.plain_negatives, config.routing.seed,
                                 rc.same_relation_negatives, relation_wordings(pool), rc.negative_wordings)
        owners: dict[str, dict[int, str]] = {}  # negative -> {edit: kind}
        for k, kinds in enumerate(groups):
            for kind, prompts in kinds.items():
                for p in prompts:
                    owners.setdefault(p, {})[k] = kind
        emb = routing["encoder"].encode([r.rephrases[0] for r in edits])
        distance, fired = router.route(emb)
        nearest = router.nearest_edit(emb)
        held_by = router.nearest_negative(emb)[1]
        counts: dict[str, int] = {}
        for k in range(len(edits)):
            if fired[k]:
                reason = "fires its edit" if nearest[k] == k else "fires another edit"
            elif distance[k] >= router.epsilon:
                reason = "beyond epsilon"
            else:
                mine = owners[texts[held_by[k]]]
                kind = NEGATIVE_KINDS[mine[k] if k in mine else sorted(mine.values())[0]]
                whose = "its own" if k in mine else "another edit's"
                reason = f"held back: {whose} {kind} negative"
            counts[reason] = counts.get(reason, 0) + 1
        row = {"edits": name, "n_edits": len(edits), "epsilon": router.epsilon,
               "reasons": {k: 100.0 * v / len(edits) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _negatives(routing, relations, per_relation, margin):
    """`routing` (a RoutingConfig) with these other-relation negatives."""
    return dataclasses.replace(routing, router=dataclasses.replace(
        routing.router, negatives=relations, negative_wordings=per_relation, other_relation_margin=margin))


def main() -> int:
    from answer_levers import answer_costs, answer_rates, chat_answer_rates

    parts = {arg.split("=")[0] for arg in sys.argv[1:]} or {"routing", "answers", "costs", "margin", "calibration"}
    # margin=SET,SET: only these edit sets (their rows replace those of an earlier run)
    sets = next((arg.split("=")[1].split(",") for arg in sys.argv[1:] if arg.startswith("margin=")), MARGIN_SETS)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from megedit import load_model, model_fingerprint

    model, tokenizer = load_model("smollm2", device="cpu")
    result = payload(OUT) if OUT.exists() else {}
    if "routing" in parts:
        result["routing"] = {"n_edits": 256, "rows": routing_rates(model, tokenizer, 256)}
    if "answers" in parts:
        result["answers"] = {"n_edits": 32, "rows": answer_rates(model, tokenizer, 32)}
    if "margin" in parts:
        kept = [row for row in result.get("margin", {}).get("rows", []) if row["edits"] not in sets]
        result["margin"] = {"rows": kept + margin_rates(model, tokenizer, sets)}
    if "calibration" in parts:
        result["calibration"] = {"rows": calibration_rates(model, tokenizer, MARGIN_SETS)}
    if "neighbours" in parts:
        result["neighbours"] = {"rows": neighbour_rates(model, tokenizer, MARGIN_SETS)}
    if "unknown" in parts:
        result["unknown"] = {"rows": unknown_relation_rates(model, tokenizer, MARGIN_SETS)}
    if "wordings" in parts:
        chosen = next((a.split("=")[1].split(",") for a in sys.argv[1:] if a.startswith("wordings=")), MARGIN_SETS)
        rows = wording_rates(model, tokenizer, chosen)
        written = payload(OUT) if OUT.exists() else {}  # read again: a run beside this one may have written other sets
        kept = [row for row in written.get("wordings", {}).get("rows", []) if row["edits"] not in chosen]
        result["wordings"] = {"rows": kept + rows}
    if "plain" in parts:
        result["plain"] = {"rows": plain_rates(model, tokenizer, MARGIN_SETS)}
    if "gate" in parts:
        result["gate"] = {"rows": gate_rates(model, tokenizer, MARGIN_SETS)}
    if "misses" in parts:
        result["misses"] = {"rows": miss_reasons(model, tokenizer, MARGIN_SETS)}
    if "costs" in parts:
        result["costs"] = {"n_edits": 64, "rows": answer_costs(model, tokenizer, 64)}
    if "chat-answer" in parts:
        result["chat_answer"] = {"rows": chat_answer_rates(model, tokenizer, MARGIN_SETS, 128)}
    result |= {"model": "smollm2", "seed": 0, "threads": torch.get_num_threads()}
    data = {name: SHARED / f"{name}.json" for name in ("counterfact-edit", "counterfact-train")}
    if parts & {"margin", "calibration", "neighbours", "unknown", "wordings", "plain", "gate", "misses", "chat-answer"}:
        data["zsre"] = SHARED.parent / "zsre/zsre_mend_train-1k.json"
    write_result(OUT, result, model="smollm2", fingerprint=model_fingerprint(model), n=None, seed=0, method="meg",
                 config=None, data=data, unknown={"n": "each part's own (its n_edits or rows)",
                                                  "method.config": "MeGConfig's defaults with each row's lever"})
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
