"""Questions about an edit's subject, of relations near its own: does the edit take them over?

The harness's specificity probes are 3 of the pool's other relations per edit, drawn at random, so
their average is mostly relations far from the edit's. This bench asks a fixed set of questions,
filled with every edit's subject: pool wordings of relations near many edits' (where a person was
born, is a citizen, died; a field of work; a native language), one wording the pool lacks, and a
plain request. Edits of the relation a question asks (the pool's grouping of wordings by their
answers, data/specificity.py) are left out of its count.

Per question: the share that fires the subject's own edit, the share that fires any edit, and, for
the first --answers edits, the share whose greedy answer (8 tokens, the harness's decoder) differs
from the unedited model's.

    .venv/bin/python bench/subject_probes.py PACK [--data counterfact:PATH] [--answers 128]

PACK: an edit pack of the records in --data (e.g. `megedit fit --data counterfact:... --limit 1024`).
Result: bench/results/subject-probes-<pack folder>.json; docs/results.md shows it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from result_schema import write_result

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = f"counterfact:{HERE.parents[1] / 'shared/data/counterfact/counterfact-edit.json'}"
DEFAULT_POOL = f"counterfact:{HERE.parents[1] / 'shared/data/counterfact/counterfact-train.json'}"
# (question, the pool wording whose relation it asks: edits of that relation are left out; None: none)
QUESTIONS = [
    ("{} was born in", "{} was born in"),
    ("{} was born in the country of", "{} was born in"),  # not a pool wording
    ("{} is a citizen of", "{} is a citizen of"),
    ("{} died in", "{} died in"),
    ("{} works in the field of", "{} works in the field of"),
    ("The native language of {} is", "The native language of {} is"),
    ("Tell me about {}.", None),
    # written for megedit, none of them a pool wording: what a user asks, in forms the method never saw
    ("Where was {} born?", "{} was born in"),
    ("{} was born in the city of", "{} was born in"),
    ("The birthplace of {} is", "{} was born in"),
    ("What is the nationality of {}?", "{} is a citizen of"),
    ("Where did {} die?", "{} died in"),
    ("{} is known for their work in", "{} works in the field of"),
    ("What language does {} speak?", "The native language of {} is"),
]
# other questions about a subject in sentence form, written for megedit; none asks a relation of CounterFact
# or ZsRE (their answers are years, numbers, materials, weather): bench/real_use_levers.py gate
FREE_FORM = ["{} was built in the year", "{} was founded in the year", "How old is {}?",
             "The population of {} is about", "{} has been around since the year", "What is {} made of?",
             "The size of {} is", "How many people visit {} each year?", "The most interesting fact about {} is",
             "{} became famous in the year", "The weather in {} is usually"]


def asks_it(wording: str | None, wordings):
    """Whether an edit asks the relation of the pool wording `wording` (the pool's grouping of
    wordings by their answers); nothing asks it when the wording is None or not the pool's."""
    relation = wordings.relation.get(wording)
    return lambda r: relation is not None and relation in wordings.of(r)


def probe(edited, edits, question: str, same, answers: int) -> dict:
    """Firing (all edits left) and answer changes (the first `answers` of them) for one question."""
    kept = [r for r in edits if not same(r)]
    texts = [question.format(r.subject) for r in kept]
    routing = edited.routing(texts)
    own = [e == r.case_id for e, r in zip(routing.edits, kept)]
    row = {"question": question, "n": len(kept), "fires_own": 100.0 * sum(own) / len(kept),
           "fires_any": 100.0 * float(routing.fired.float().mean())}
    if answers:
        sample = texts[:answers]
        new = edited.generate(sample, max_new_tokens=8)
        with edited.unedited():
            old = edited.generate(sample, max_new_tokens=8)
        row |= {"n_answers": len(sample), "answer_changed": 100.0 * sum(a != b for a, b in zip(new, old)) / len(sample)}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pack", type=Path)
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="KIND:PATH", help="the pack's edit records")
    parser.add_argument("--pseudo", default=DEFAULT_POOL, metavar="KIND:PATH", help="the pool whose relations count")
    parser.add_argument("--answers", type=int, default=128, help="edits per question whose answers are compared")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from megedit import EditedModel, load_model, load_requests
    from megedit.data import parse_data_arg
    from megedit.data.specificity import relation_wordings, wording_half

    model, tokenizer = load_model("smollm2")
    edited = EditedModel.from_pretrained(args.pack, model, tokenizer)
    kind, path = parse_data_arg(args.data)
    ids = set(edited.edits.case_ids)
    edits = [r for r in load_requests(kind, path, skip_invalid=True) if r.case_id in ids]
    pool_kind, pool_path = parse_data_arg(args.pseudo)
    wordings = relation_wordings(load_requests(pool_kind, pool_path))
    rows = []
    for question, wording in QUESTIONS:
        rows.append({**probe(edited, edits, question, asks_it(wording, wordings), args.answers),
                     "pool_wording": question in wordings.relation, "relation": wordings.relation.get(wording),
                     "half": wording_half(question) if question in wordings.relation else None})
        print(rows[-1], flush=True)
    out = args.out or HERE / "results" / f"subject-probes-{args.pack.resolve().name}.json"
    write_result(out, {"pack": str(args.pack), "n_edits": len(edits), "rows": rows}, model="smollm2",
                 fingerprint=edited.fingerprint, n=len(edits), seed=0, method="meg (a saved pack)",
                 config=edited.config or None, data={"edits": path, "pool": pool_path},
                 threads=torch.get_num_threads(),
                 unknown={"method.config": "the pack records no config"})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
