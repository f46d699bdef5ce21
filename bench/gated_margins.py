"""The router negatives' extra margins once the question gate stands behind them.

The margins (routing.router.unknown_relation_margin, plain_margin) were chosen before the question gate
existed, when a negative was the only thing between an edit and the other questions about its subject.
The gate now holds back a fired query that asks another question about the subject, so a wider margin
may give back true paraphrases that negatives hold back without letting those questions through.

Per edit set of bench/meg.py (the first 1,024 edits of each CounterFact file, the other file the pool; the
998 ZsRE edits, pool counterfact-train.json) with its default stages B and C: each margin setting routes the
harness's three query kinds, every plain prompt about each edit's subject, bench/subject_probes.py's
questions and free-form questions, then applies the default gate (routing.router.question_gate and
question_gate_lone). On the two CounterFact sets every relation is known, so they run blind, the case the
unknown-relation margin is for: each edit's negatives are drawn as if its relation were unknown (its own
relation among them at times) and the gate knows its prompt alone. ZsRE runs as it is (765 of 998 edits'
relations are unknown). Settings are chosen on the first CounterFact file; the others are checks.

    OMP_NUM_THREADS=2 .venv/bin/python bench/gated_margins.py [SET ...]

Result: bench/results/gated-margins.json (a run of some sets keeps the other sets' rows); docs/method.md shows it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from real_use_levers import MARGIN_SETS, blind_view, embed_queries, meg_set_stage_c, subject_queries
from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "gated-margins.json"
# (unknown_relation_margin, plain_margin, gate on); the first row is the defaults before the gate
MARGIN_SETTINGS = ((0.02, 0.0, False), (0.02, 0.0, True), (0.05, 0.0, True), (0.1, 0.0, True), (0.2, 0.0, True),
                   (0.02, 0.05, True), (0.05, 0.05, True), (0.1, 0.05, True), (0.1, 0.1, True))


@dataclasses.dataclass
class SetUp:
    """One edit set with its default stages B and C, its queries (embedded) and its question gate; blind: every
    edit's relation treated as unknown (negatives drawn as such, the gate knowing its prompt alone)."""

    name: str
    blind: bool
    config: object
    edits: list
    routing: dict
    pool: list
    negative_view: object
    gate: object
    queries: dict
    embedded: dict

    def negatives(self, routing_config=None) -> tuple[list[str], torch.Tensor]:
        """The router's negatives as drawn for this set-up (under `routing_config`, default the defaults'), and
        their margins."""
        from megedit.stages.routing import edit_negatives

        return edit_negatives(self.edits, self.pool, routing_config or self.config.routing, self.negative_view)

    def row(self, router, gated: bool, **lever) -> dict:
        rc = self.config.routing.router
        row = {"edits": self.name, "n_edits": len(self.edits), "blind": self.blind, **lever,
               "question_gate": rc.question_gate if gated else None,
               "question_gate_lone": rc.question_gate_lone if gated else None, "epsilon": router.epsilon,
               **gated_rates(router, self.gate, self.queries, self.embedded, gated)}
        print(json.dumps(row), flush=True)
        return row


def set_up(model, tokenizer, name: str, blind: bool) -> SetUp:
    from megedit import MeGEditor
    from megedit.data.specificity import relation_wordings
    from megedit.stages.question_gate import QuestionGate

    config, edits, routing, pool = meg_set_stage_c(model, tokenizer, name)
    wordings = relation_wordings(pool)
    variants = [() for _ in edits] if blind else MeGEditor(model, tokenizer, config, progress=False).variants(
        edits, pool)[0]
    rc = config.routing.router
    gate = QuestionGate(routing["encoder"], [r.subject for r in edits], [r.prompt for r in edits], variants,
                        rc.question_gate, rc.question_gate_lone)
    queries = subject_queries(edits, wordings)
    return SetUp(name, blind, config, edits, routing, pool, blind_view(wordings) if blind else wordings, gate,
                 queries, embed_queries(routing["encoder"], queries))


def gated_rates(router, gate, queries: dict, embedded: dict, gated: bool) -> dict:
    """Per kind: the share of queries that fire an edit, and their own edit, after the gate (percent)."""
    rates = {}
    for kind, (emb, owners) in embedded.items():
        fired, near = router.familiar(emb), router.nearest_edit(emb)
        at = fired.nonzero().flatten().tolist()
        if gated and at:
            passes = gate.passes([queries[kind][i][0] for i in at], [near[i] for i in at])
            fired[[i for i, ok in zip(at, passes) if not ok]] = False
        own = torch.tensor(near) == owners
        rates[kind] = {"n": len(owners), "fires": 100.0 * float(fired.float().mean()),
                       "fires_own_edit": 100.0 * float((fired & own).float().mean())}
    return rates


def margin_rows(model, tokenizer, name: str) -> list[dict]:
    """The CounterFact sets blind, ZsRE as it is; each margin setting with and without the gate."""
    up = set_up(model, tokenizer, name, blind=name != "zsre")
    texts = up.negatives()[0]
    negatives = up.routing["encoder"].encode(texts, progress=True)
    base, rc = dataclasses.replace(up.routing["router"], negatives=None), up.config.routing.router
    rows = []
    for unknown, plain, gated in MARGIN_SETTINGS:
        routing_config = dataclasses.replace(up.config.routing, router=dataclasses.replace(
            rc, unknown_relation_margin=unknown, plain_margin=plain))
        router = base.with_negatives(negatives, margins=up.negatives(routing_config)[1])
        rows.append(up.row(router, gated, unknown_relation_margin=unknown, plain_margin=plain, n_negatives=len(texts)))
    return rows


def main() -> int:
    sets = sys.argv[1:] or list(MARGIN_SETS)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from megedit import load_model, model_fingerprint

    model, tokenizer = load_model("smollm2", device="cpu")
    rows = [row for name in sets for row in margin_rows(model, tokenizer, name)]
    earlier = payload(OUT).get("rows", []) if OUT.exists() else []
    result = {"rows": [r for r in earlier if r["edits"] not in sets] + rows, "model": "smollm2", "seed": 0,
              "threads": torch.get_num_threads()}
    shared = HERE.parents[1] / "shared/data"
    data = {"counterfact-edit": shared / "counterfact/counterfact-edit.json",
            "counterfact-train": shared / "counterfact/counterfact-train.json",
            "zsre": shared / "zsre/zsre_mend_train-1k.json"}
    write_result(OUT, result, model="smollm2", fingerprint=model_fingerprint(model), n=None, seed=0, method="meg",
                 config=None, data=data, unknown={"n": "each row's n_edits",
                                                  "method.config": "MeGConfig's defaults with each row's margins"})
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
