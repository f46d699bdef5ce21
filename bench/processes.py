"""Forked one-thread processes against one process using every thread, side by side in one run:
stage A (fit_neurons) and the evaluation (evaluate, its pre-edit reference included) of the first
N CounterFact edits on SmolLM2, with each edit's pool wordings as `megedit fit` builds them (pool
counterfact-train.json, defaults, seed 0). Each arm starts from an empty work dir and cache.

    .venv/bin/python bench/processes.py --limit 256        # -> bench/results/processes-cf-256.json

Run it with nothing else on the machine (the load average before each arm is recorded). The
one-process arm runs on every thread torch has (OMP_NUM_THREADS, default the cores); the other
on --processes one-thread processes. bench/update_readme.py shows the result.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from result_schema import write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data/counterfact"
CF_EDIT, CF_TRAIN = SHARED / "counterfact-edit.json", SHARED / "counterfact-train.json"


def arm(model, tokenizer, requests, variants, processes: int) -> dict:
    """Stage A then the evaluation of its fitted vectors, with `processes` processes, timed."""
    from megedit.data.prompts import get_format
    from megedit.eval import evaluate
    from megedit.stages.fit_neurons import fit_neurons, fitted_subject

    fmt = get_format("raw")
    with tempfile.TemporaryDirectory(prefix="megedit-bench-") as scratch:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        fit = fit_neurons(model, tokenizer, requests, fmt, progress=False, work_dir=Path(scratch) / "shards",
                          variants=variants, processes=processes)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        subject = fitted_subject(model, tokenizer, fit)
        report = evaluate(subject, requests, prompt_format=fmt, progress=False, cache_dir=Path(scratch) / "cache",
                          processes=processes)
        eval_s = time.perf_counter() - start
        subject.neuron.detach()
    print(f"{processes} process(es): stage A {fit_s:.0f} s, eval {eval_s:.0f} s")
    return {"processes": processes, "threads_each": 1 if processes > 1 else torch.get_num_threads(),
            "load_before": load_before, "fit_s": fit_s, "eval_s": eval_s, "fit_success": fit.success_rate,
            "vectors": fit.vectors, "metrics": report.metrics, "score": report.score}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from megedit import MeGConfig, MeGEditor, load_model, load_requests, model_fingerprint

    model, tokenizer = load_model("smollm2", device="cpu")
    requests = load_requests("counterfact", CF_EDIT, limit=args.limit)
    pool = load_requests("counterfact", CF_TRAIN)
    variants, _ = MeGEditor(model, tokenizer, MeGConfig(), progress=False).variants(requests, pool)
    one, many = (arm(model, tokenizer, requests, variants, p) for p in (1, args.processes))
    gap = float((one.pop("vectors") - many.pop("vectors")).abs().max())
    result = {"n": args.limit, "data": f"counterfact:{CF_EDIT.name}", "pool": f"counterfact:{CF_TRAIN.name}",
              "model": "smollm2", "seed": 0, "cpus": os.cpu_count(), "one": one, "many": many,
              "max_vector_difference": gap, "fit_speedup": one["fit_s"] / many["fit_s"],
              "eval_speedup": one["eval_s"] / many["eval_s"]}
    path = write_result(HERE / "results" / f"processes-cf-{args.limit}.json", result, model="smollm2",
                        fingerprint=model_fingerprint(model), n=args.limit, seed=0, method="meg stage A",
                        config=None, data={"edits": CF_EDIT, "pool": CF_TRAIN},
                        unknown={"method.config": "fit_neurons' defaults and MeGConfig()'s wordings of this revision"})
    print(f"stage A {result['fit_speedup']:.2f}x, eval {result['eval_speedup']:.2f}x faster with {args.processes} "
          f"one-thread processes than 1 process of {one['threads_each']} threads; largest vector difference "
          f"{gap:.2g}; fitted vectors' RelAG {one['metrics']['reliability']['ag']:.1f} / "
          f"{many['metrics']['reliability']['ag']:.1f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
