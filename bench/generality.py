"""Generality levers of stage A and stage D on SmolLM2 + CounterFact (issue: edits that carry to
paraphrases).

    .venv/bin/python bench/generality.py levers --limit 128       # stage A settings -> fitted vectors' GenAG
    .venv/bin/python bench/generality.py levers --limit 128 --swap # the two CounterFact files' roles swapped
    .venv/bin/python bench/generality.py levers --limit 1024 --exclude own --only "prompt only, margin 1" \
        "defaults: margin 3, 4 paraphrases, lr 0.3" "margin 3, 2 paraphrases, lr 0.3"   # stage A's cost

`cost` times stage A on the first N edits three ways, one after the other in one job, each in a
process of its own: the code of the revision where the Generality issue was filed (`--before`,
its own defaults: the prompt alone, margin 1, lr 0.1), today's code with those settings, and
today's defaults (building the wordings included). Model loading is not timed.

    .venv/bin/python bench/generality.py cost --limit 1024      # -> bench/results/stage-a-cost-<N>.json

`levers` fits the first N edits under each stage A setting (margin, pool paraphrases, context
prefixes) and scores each edit's fitted vector on its own prompt and rephrase (no generator, no
router: the Generality the vectors carry on their own, which bounds MeG's), with the time the fit
took. Every setting runs with the variant builder told to leave out the wordings of the
evaluated records' own rephrases (`--exclude`, default "all": no edit trains on any wording a
test rephrase uses), so the table measures transfer to wordings no variant used.
Each row is written as it finishes (a killed run keeps them and runs the rest; `--only` reruns
the rows named). Results: bench/results/generality-levers[-swap][-<exclude>]-<N>.json;
bench/update_readme.py shows them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data/counterfact"
FILES = (SHARED / "counterfact-edit.json", SHARED / "counterfact-train.json")

# (label, FitConfig overrides); the first row is the default of before, the cost baseline
LEVERS = [
    ("prompt only, margin 1", {"margin": 1.0, "lr": 0.1}),
    ("prompt only, margin 3", {"margin": 3.0, "lr": 0.1}),
    ("margin 1, 4 paraphrases", {"margin": 1.0, "paraphrases": 4, "lr": 0.1, "wording_schedule": "all"}),
    ("margin 3, 4 paraphrases", {"margin": 3.0, "paraphrases": 4, "lr": 0.1, "wording_schedule": "all"}),
    ("margin 3, 2 prefixes", {"margin": 3.0, "prefixes": 2, "lr": 0.1, "wording_schedule": "all"}),
    ("margin 3, 4 paraphrases + 2 prefixes", {"margin": 3.0, "paraphrases": 4, "prefixes": 2, "lr": 0.1,
                                              "wording_schedule": "all"}),
    ("margin 3, 2 paraphrases + 1 prefix", {"margin": 3.0, "paraphrases": 2, "prefixes": 1, "lr": 0.1,
                                            "wording_schedule": "all"}),
    ("margin 3, 4 paraphrases, lr 0.3, all wordings every step", {"margin": 3.0, "paraphrases": 4, "lr": 0.3,
                                                                  "wording_schedule": "all"}),
    ("margin 3, 2 paraphrases, lr 0.3", {"margin": 3.0, "paraphrases": 2, "lr": 0.3, "wording_schedule": "all"}),
    ("defaults: margin 3, 4 paraphrases, lr 0.3, prompt first", {"margin": 3.0, "paraphrases": 4, "lr": 0.3,
                                                                 "wording_schedule": "prompt-first"}),
    # cheaper stage A candidates, prompt first
    ("margin 3, 3 paraphrases, lr 0.3, prompt first", {"margin": 3.0, "paraphrases": 3, "lr": 0.3,
                                                       "wording_schedule": "prompt-first"}),
    ("margin 3, 2 paraphrases, lr 0.3, prompt first", {"margin": 3.0, "paraphrases": 2, "lr": 0.3,
                                                       "wording_schedule": "prompt-first"}),
    ("margin 3, 4 paraphrases, lr 0.5, prompt first", {"margin": 3.0, "paraphrases": 4, "lr": 0.5,
                                                       "wording_schedule": "prompt-first"}),
    ("margin 2, 4 paraphrases, lr 0.3, prompt first", {"margin": 2.0, "paraphrases": 4, "lr": 0.3,
                                                       "wording_schedule": "prompt-first"}),
    # an edit the pool has no paraphrase for (a relation it does not know): today's defaults otherwise
    ("prompt alone, defaults", {"paraphrases": 0}),
    ("prompt alone + 2 prefixes, defaults", {"paraphrases": 0, "prefixes": 2}),
]


def levers(args, path: Path) -> dict:
    from megedit import MeGConfig, MeGEditor, evaluate, load_model, load_requests, model_fingerprint
    from megedit.data.prompts import get_format
    from megedit.stages.fit_neurons import fit_neurons, fitted_subject

    edits_path, pool_path = FILES[::-1] if args.swap else FILES
    requests = load_requests("counterfact", edits_path, limit=args.limit)
    pool = load_requests("counterfact", pool_path)
    scored = [dataclasses.replace(r, locality=()) for r in requests]  # the static neuron's locality is not the question
    model, tokenizer = load_model("smollm2", device="cpu")
    fingerprint = model_fingerprint(model)
    out = {"n": args.limit, "edits": edits_path.name, "pool": pool_path.name, "exclude_eval_templates": args.exclude,
           "layer": None, "seed": args.seed, "threads": torch.get_num_threads(), "rows": []}
    done = {r["setting"]: r for r in payload(path)["rows"]} if path.exists() else {}
    for label, overrides in LEVERS:
        rerun = bool(args.only) and label in args.only
        if label in done and not rerun:  # a killed run resumes: rows already measured are kept
            out["rows"].append(done[label])
            continue
        if args.only and not rerun:
            continue
        config = MeGConfig(seed=args.seed)
        config.fit = dataclasses.replace(config.fit, **{"paraphrases": 0, "prefixes": 0, **overrides,
                                                        "exclude_eval_templates": args.exclude})
        editor = MeGEditor(model, tokenizer, config, progress=False)
        start = time.perf_counter()
        variants, record = editor.variants(requests, pool)
        build_s = time.perf_counter() - start
        result = fit_neurons(model, tokenizer, requests, get_format("raw"), editor.config.fit, progress=False,
                             variants=variants)
        subject = fitted_subject(model, tokenizer, result)
        try:
            report = evaluate(subject, scored, prompt_format="raw", progress=False, batch_size=64)
        finally:
            subject.neuron.detach()
        summary = result.summary()
        row = {"setting": label, **overrides, "success_rate": summary["success_rate"],
               "median_steps": summary["median_steps"], "wordings_passed": summary["wordings_passed"],
               "mean_wordings": record["mean_wordings"], "edits_with_paraphrases": record["edits_with_paraphrases"],
               "fit_s": result.timing["total_s"], "build_s": build_s, "metrics": report.metrics}
        out["rows"].append(row)
        out["layer"] = editor.config.fit.layer
        write_result(path, out, model="smollm2", fingerprint=fingerprint, n=args.limit, seed=args.seed,
                     method="meg stage A", config=None, data={"edits": edits_path, "pool": pool_path},
                     unknown={"method.config": "one stage A setting per row (its overrides in the row)"})
        print(f"{label:40s} GenAG {report.metrics['generality']['ag']:5.1f} GenTF {report.metrics['generality']['tf']:5.1f} "
              f"RelAG {report.metrics['reliability']['ag']:5.1f} steps {summary['median_steps']} fit {row['fit_s']:.0f} s "
              f"wordings {record['mean_wordings']:.1f}", flush=True)
    return out


# one stage A fit, run in a process of its own: argv = edits file, pool file, N, overrides (JSON; null: the
# revision's own FitConfig defaults, no wordings, the only call an older revision understands)
COST_DRIVER = r"""
import dataclasses, json, sys, time
import torch
from megedit import load_model, load_requests
from megedit.data.prompts import get_format
from megedit.stages.fit_neurons import FitConfig, fit_neurons  # the name older revisions define there
edits, pool, limit, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
requests = load_requests("counterfact", edits, limit=limit)
model, tokenizer = load_model("smollm2", device="cpu")
start = time.perf_counter()
if overrides is None:
    config, variants = FitConfig(), {}
else:
    from megedit import MeGConfig, MeGEditor
    pool = load_requests("counterfact", pool)
    start = time.perf_counter()
    settings = MeGConfig()
    settings.fit = dataclasses.replace(settings.fit, **overrides)
    editor = MeGEditor(model, tokenizer, settings, progress=False)
    config, variants = editor.config.fit, {"variants": editor.variants(requests, pool)[0]}
result = fit_neurons(model, tokenizer, requests, get_format("raw"), config, progress=False, **variants)
summary = result.summary()
print(json.dumps({"stage_a_s": time.perf_counter() - start, "success_rate": summary["success_rate"],
                  "median_steps": summary["median_steps"], "mean_wordings": summary.get("mean_wordings", 1.0),
                  "config": summary["config"], "threads": torch.get_num_threads()}))
"""


def cost(args, path: Path) -> dict:
    import subprocess
    import tarfile
    import tempfile

    def git(*cmd) -> bytes:
        return subprocess.run(["git", *cmd], cwd=HERE.parent, check=True, capture_output=True).stdout

    revision = {name: git("rev-parse", rev).decode().strip() for name, rev in (("revision", "HEAD"), ("before", args.before))}
    out = {"n": args.limit, "edits": FILES[0].name, "pool": FILES[1].name, **revision, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "before.tar").write_bytes(git("archive", args.before, "src"))
        with tarfile.open(Path(tmp) / "before.tar") as tar:
            tar.extractall(tmp, filter="data")
        before, now = Path(tmp) / "src", HERE.parent / "src"
        runs = [("stage A when the issue was filed (its defaults: prompt only, margin 1, lr 0.1)", before, None),
                ("today's code, the settings of before", now, {"paraphrases": 0, "margin": 1.0, "lr": 0.1}),
                ("today's defaults (wordings built and fitted)", now, {})]
        for label, src, overrides in runs:
            command = [sys.executable, "-c", COST_DRIVER, *map(str, FILES), str(args.limit), json.dumps(overrides)]
            load_before = os.getloadavg()[0]  # another job on the machine shows here (1 per busy core)
            proc = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(src)}, check=True, capture_output=True,
                                  text=True)
            row = {"setting": label, **json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load_before,
                   "load_after": os.getloadavg()[0]}
            out["rows"].append(row)
            write_result(path, out, model="smollm2", n=args.limit, seed=None, method="meg stage A", config=None,
                         data={"edits": FILES[0], "pool": FILES[1]},
                         unknown={"seed": "each revision's FitConfig default", "model.fingerprint":
                                  "the model is loaded by each row's process", "method.config": "each row's config"})
            print(f"{label:70s} {row['stage_a_s']:7.0f} s  success {row['success_rate']:5.1f}%  "
                  f"median steps {row['median_steps']}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["levers", "cost"])
    parser.add_argument("--before", default="e130282", help="cost: the revision to time beside today's code")
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--swap", action="store_true", help="edits from counterfact-train, pool from counterfact-edit")
    parser.add_argument("--exclude", default="all", choices=["none", "own", "all"])
    parser.add_argument("--only", nargs="*", help="run only these settings (labels)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.what == "cost":
        path = HERE / "results" / f"stage-a-cost-{args.limit}.json"
        cost(args, path)
        print(f"wrote {path}")
        return 0
    name = f"generality-levers{'-swap' if args.swap else ''}{'' if args.exclude == 'all' else '-' + args.exclude}-{args.limit}"
    path = HERE / "results" / f"{name}.json"
    levers(args, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
