"""What a tighter router threshold would have scored, from a finished bench/meg.py run.

    .venv/bin/python bench/epsilon_whatif.py --limit 10000 --generator mlp

A query the router does not fire is answered by the unedited model, so for any epsilon below the
run's own, the AG numbers follow exactly from the run's cases and each query's router distance:
a locality query passes if it passed or no longer fires; an edit prompt or rephrase passes only
if it passed and still fires (the unedited model giving the new target is counted as a miss, so
Rel/Gen AG are exact or a hair low). TF is left out (it would need the unedited model's scores).
The stages come from bench/meg.py's caches; the distances take a few minutes of MiniLM.
Writes bench/results/epsilon_whatif-<N>[-generator].json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data/counterfact"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, required=True)
    parser.add_argument("--generator", default=None, help="generator kind (default: MeGConfig's)")
    parser.add_argument("--points", type=int, default=8, help="epsilons from the run's own down to 60% of it")
    args = parser.parse_args()

    from megedit import MeGConfig, MeGEditor, load_model, load_requests, model_fingerprint

    default_kind = MeGConfig().generator.kind
    kind = args.generator or default_kind
    suffix = ("" if args.limit == 1024 else f"-{args.limit}") + ("" if kind == default_kind else f"-{kind}")
    run = payload(HERE / "results" / f"meg-cf{suffix}.json")  # the stages as that run had them
    work = HERE / "results" / "cases" / "meg-counterfact"
    cases = json.loads((work / f"eval{suffix}.json").read_text())["cases"]
    requests = load_requests("counterfact", SHARED / "counterfact-edit.json", limit=args.limit, skip_invalid=True)
    pool = load_requests("counterfact", SHARED / "counterfact-train.json")
    model, tokenizer = load_model("smollm2", device="cpu")
    config = MeGConfig.from_dict(run["config"])
    edited = MeGEditor(model, tokenizer, config).fit(requests, work, pool, "counterfact:counterfact-train.json")
    own = float(edited.router.epsilon)
    distance = edited.route([c["query"] for c in cases])[1].tolist()
    curve = edited.router.record.get("calibration", {}).get("curve", [])
    rows = []
    for i in range(args.points + 1):
        eps = own * (1 - 0.4 * i / args.points)
        ag = {kind: [] for kind in ("reliability", "generality", "locality")}
        for case, d in zip(cases, distance):
            fires = d < eps
            ag[case["kind"]].append(case["ag"] or not fires if case["kind"] == "locality" else case["ag"] and fires)
        pool = max((r for r in curve if r["epsilon"] <= eps), key=lambda r: r["epsilon"], default={})
        rows.append({"epsilon": eps, **{k: 100.0 * sum(v) / len(v) for k, v in ag.items()},
                     "pool_recall": pool.get("recall"), "pool_false_fire": pool.get("false_fire")})
        print(f"epsilon {eps:.3f}: " + ", ".join(f"{k} AG {rows[-1][k]:.1f}" for k in ag)
              + f"; pool recall {pool.get('recall')}, false fire {pool.get('false_fire')}", flush=True)
    calibration = edited.router.record.get("calibration", {})
    out = HERE / "results" / f"epsilon_whatif{suffix}.json"
    write_result(out, {"n": args.limit, "generator": kind, "own_epsilon": own, "rows": rows,
                       "calibration_choice": calibration.get("chosen"), "seed": 0,
                       "data": "counterfact:counterfact-edit.json", "model": "smollm2"},
                 model="smollm2", fingerprint=model_fingerprint(model), n=args.limit, seed=0, method="meg",
                 config=run["config"], data={"edits": SHARED / "counterfact-edit.json",
                                             "pool": SHARED / "counterfact-train.json"})
    print(f"wrote {out}")
    edited.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
