"""MEMIT and AlphaEdit on a small CounterFact sample, over their main weight (a quick check that
the method works on this model, and how its weight trades reliability for locality).

    .venv/bin/python bench/memit_sweep.py --limit 32 --runs memit:15000,memit:1000,memit:100,alphaedit:10
    .venv/bin/python bench/memit_sweep.py --limit 32 --runs memit:1000:1-5,memit:1000:8-12 --tag layers

Each run (METHOD:WEIGHT[:FIRST-LAST layers, default 4-8]) edits the first N CounterFact edits at
once (covariance from 4,000 texts of counterfact-train.json), scores them with the shared
harness, and puts the original weights back.
Results: bench/results/memit_sweep-<N>[-<tag>].json (bench/update_readme.py shows them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CF = HERE.parents[1] / "shared/data/counterfact/counterfact-edit.json"
POOL = HERE.parents[1] / "shared/data/counterfact/counterfact-train.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--runs", default="memit:15000,memit:1000,memit:100,alphaedit:10",
                        help="METHOD:WEIGHT (MEMIT's lambda, AlphaEdit's ridge term)")
    parser.add_argument("--cov-texts", type=int, default=4000)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from megedit import evaluate, load_model, load_requests
    from megedit.baselines.memit import MemitConfig, batch_edit, pool_texts
    from megedit.data.prompts import get_format
    from megedit.io import atomic_write_json

    model, tokenizer = load_model("smollm2", device="cpu")
    requests = load_requests("counterfact", CF, limit=args.limit)
    texts = pool_texts(load_requests("counterfact", POOL))[: args.cov_texts]
    rows = []
    for run in args.runs.split(","):
        method, weight, *span = run.split(":")
        layers = tuple(range(int(span[0].split("-")[0]), int(span[0].split("-")[1]) + 1)) if span else None
        config = MemitConfig(method=method, layers=layers,
                             **({"mom2_weight": float(weight)} if method == "memit" else {"l2": float(weight)}))
        start = time.perf_counter()
        subject = batch_edit(model, tokenizer, requests, get_format("raw"), texts, config, progress=False)
        edit_s = time.perf_counter() - start
        report = evaluate(subject, requests, data_kind="counterfact", batch_size=64, progress=False)
        subject.restore()
        rows.append({"method": method, "weight": float(weight), "metrics": report.metrics, "score": report.score,
                     "edit_s": edit_s, "settings": subject.settings})
        m = report.metrics
        print(f"{run}: Rel {m['reliability']['ag']:.1f}/{m['reliability']['tf']:.1f} "
              f"Gen {m['generality']['ag']:.1f}/{m['generality']['tf']:.1f} "
              f"Loc {m['locality']['ag']:.1f}/{m['locality']['tf']:.1f} Score {report.score:.2f} ({edit_s:.0f} s)")
    path = atomic_write_json(HERE / "results" / (f"memit_sweep-{args.limit}" + (f"-{args.tag}" if args.tag else "")
                                                 + ".json"),
                             {"n": len(requests), "data": f"counterfact:{CF.name}", "format": "raw", "seed": 0,
                              "cov_source": f"counterfact:{POOL.name}", "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
