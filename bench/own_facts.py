"""Your own facts, as users write them, fitted with the defaults and no pool (megedit's fallback pool
stands in), then scored with the shared harness on SmolLM2:

- `own`: the 64 shipped facts with a prompt and a target only (data/own-facts-64.jsonl);
- `sentences`: 32 facts with sentence-long targets (12-16 words), a subject and a rephrase each
  (data/sentence-facts.jsonl).

Each fact is scored with an unrelated question of the demo pool (Locality), the fallback pool's
probe wordings filled with its subject where it names one (Specificity), and its prompt and
rephrase as chats. Reports stage A's success rate and seconds per edit beside the metrics.

    OMP_NUM_THREADS=2 .venv/bin/python bench/own_facts.py own
    OMP_NUM_THREADS=2 .venv/bin/python bench/own_facts.py sentences

`--no-infer-subjects` fits the facts without the subjects megedit takes from their prompts (the
evaluation's specificity probes still ask about those subjects), for the comparison.

Result: bench/results/own-facts-<set>[-no-inferred-subjects].json; stages cached in bench/results/cases/own-facts-<set>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import torch
from result_schema import write_result

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=("own", "sentences"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-infer-subjects", action="store_true",
                        help="fit without subjects taken from the prompts (the evaluation still asks about them)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.INFO)

    from megedit import MeGConfig, MeGEditor, evaluate, load_model, load_requests, model_fingerprint
    from megedit.data import LocalityQuery
    from megedit.data.demo import DEMO_POOL, OWN_FACTS, SENTENCE_FACTS, fallback_pool
    from megedit.data.specificity import with_specificity

    path = OWN_FACTS if args.set == "own" else SENTENCE_FACTS
    facts = load_requests("jsonl", path)
    unrelated = [q.prompt for r in load_requests("jsonl", DEMO_POOL) for q in r.locality
                 if q.prompt not in {f.prompt for f in facts}]  # two of them are facts of the shipped set
    model, tokenizer = load_model("smollm2", device="cpu")
    config = MeGConfig(seed=args.seed, infer_subjects=not args.no_infer_subjects)
    suffix = "-no-inferred-subjects" if args.no_infer_subjects else ""
    work = HERE / "results" / "cases" / f"own-facts-{args.set}"
    start, load_before = time.perf_counter(), os.getloadavg()[0]  # another job on the machine shows here
    edited = MeGEditor(model, tokenizer, config).fit(facts, work)  # no pool: the fallback pool serves
    fit_s = time.perf_counter() - start
    scored = [dataclasses.replace(r, locality=(LocalityQuery(unrelated[k % len(unrelated)]),))
              for k, r in enumerate(facts)]
    scored = with_specificity(scored, fallback_pool(), 3, args.seed)
    longest = max(len(tokenizer(" " + r.target)["input_ids"]) for r in facts)
    report = evaluate(edited, scored, data_name=f"jsonl:{path.name}", chat_edits=None,
                      checkpoint=work / f"eval{suffix}.partial.json")  # the answer budget: 20 tokens or the longest target
    print(report.table())
    fit = edited.record["fit"]
    summary = {k: v for k, v in report.to_dict().items() if k != "cases"}
    summary |= {"set": args.set, "pool": edited.record["pool"], "seed": args.seed, "config": config.to_dict(),
                "fit_success": fit["success_rate"], "fit_s": fit_s,
                # the fit's own time, also when an earlier run of this bench fitted (and cached) stage A
                "stage_a_s_per_edit": (edited.record["timing"]["A"]["fit_s"] or 0.0) / len(facts),
                "longest_target_tokens": longest, "threads": torch.get_num_threads(),
                "load_before": load_before, "load_after": os.getloadavg()[0],
                "examples": [c for c in report.cases if c["kind"] == "chat"][:6]}
    out = HERE / "results" / f"own-facts-{args.set}{suffix}.json"
    write_result(out, summary, model="smollm2", fingerprint=model_fingerprint(model), n=len(facts), seed=args.seed,
                 method="meg", config=summary["config"], data={"edits": path, "locality": DEMO_POOL})
    print(f"stage A success {fit['success_rate']:.1f}%, {summary['stage_a_s_per_edit']:.1f} s per edit; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
