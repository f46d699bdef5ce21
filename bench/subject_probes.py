"""Questions about an edit's subject that the pseudo-edit pool never asks: does the edit take them over?

The harness's specificity probes and the router's negatives are both drawn from the pool's wordings
of other relations, so together they can only say how an edit treats relations the pool knows.
This bench asks hand-written questions instead, some of relations CounterFact lacks (birthplace),
some worded unlike the pool, each filled with every edit's subject. An edit whose own prompt asks
the same thing (a keyword of the question in its prompt) is left out of that question's count.

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
# (question, keywords of an edit prompt that asks the same thing: such edits are left out of its count)
QUESTIONS = [
    ("{} was born in", ("born", "birth")),
    ("{} was born in the country of", ("born", "birth", "citizen")),
    ("{} is a citizen of", ("citizen",)),
    ("{} died in", ("died", "death")),
    ("{} works in the field of", ("field", "work", "profession", "occupation")),
    ("The native language of {} is", ("language", "tongue", "speak", "native")),
    ("Tell me about {}.", ()),
]


def probe(edited, edits, question: str, keywords, answers: int) -> dict:
    """Firing (all edits left) and answer changes (the first `answers` of them) for one question."""
    kept = [r for r in edits if not any(k in r.prompt.lower() for k in keywords)]
    texts = [question.format(r.subject) for r in kept]
    routing = edited.routing(texts)
    own = [e == r.case_id for e, r in zip(routing.edits, kept)]
    row = {"question": question, "n": len(kept), "fires_own": 100.0 * sum(own) / len(kept),
           "fires_any": 100.0 * float(routing.fired.float().mean())}
    if answers:
        sample = texts[:answers]
        new = edited.generate(sample, max_new_tokens=8)
        edited.enabled = False
        try:
            old = edited.generate(sample, max_new_tokens=8)
        finally:
            edited.enabled = True
        row |= {"n_answers": len(sample), "answer_changed": 100.0 * sum(a != b for a, b in zip(new, old)) / len(sample)}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pack", type=Path)
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="KIND:PATH", help="the pack's edit records")
    parser.add_argument("--answers", type=int, default=128, help="edits per question whose answers are compared")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from megedit import EditedModel, load_model, load_requests
    from megedit.data import parse_data_arg

    model, tokenizer = load_model("smollm2")
    edited = EditedModel.from_pretrained(args.pack, model, tokenizer)
    kind, path = parse_data_arg(args.data)
    ids = set(edited.edits.case_ids)
    edits = [r for r in load_requests(kind, path, skip_invalid=True) if r.case_id in ids]
    rows = []
    for question, keywords in QUESTIONS:
        rows.append(probe(edited, edits, question, keywords, args.answers))
        print(rows[-1], flush=True)
    out = args.out or HERE / "results" / f"subject-probes-{args.pack.resolve().name}.json"
    write_result(out, {"pack": str(args.pack), "n_edits": len(edits), "rows": rows}, model="smollm2",
                 fingerprint=edited.fingerprint, n=len(edits), seed=0, method="meg (a saved pack)",
                 config=edited.config or None, data={"edits": path}, threads=torch.get_num_threads(),
                 unknown={"method.config": "the pack records no config"})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
