"""The weight-editing baselines on a small CounterFact sample, over their main settings: does each
method work on this model, and how does it trade reliability for locality.

    .venv/bin/python bench/baseline_sweep.py --limit 128 --runs memit:15000,memit:5000,alphaedit:10 --tag authors
    .venv/bin/python bench/baseline_sweep.py --limit 128 --runs memit:15000:3-7 --tag traced
    .venv/bin/python bench/baseline_sweep.py --limit 128 --runs ft:5e-4:24,ft:5e-4:12:5e-4 --tag ft
    .venv/bin/python bench/baseline_sweep.py --limit 32 --cov pool --contexts 0 --kl 0   # the setup before the authors'

Runs: MEMIT / AlphaEdit as METHOD:WEIGHT[:FIRST-LAST] (lambda or the ridge term a; the edited
span, default 4-8); FT as ft:LR:LAYER[:BOX] (Adam on the MLP of LAYER, at most 25 epochs, stopped
once an epoch's mean loss is below 0.01; BOX: each weight kept within BOX of its original, FT-L).
Each run edits the first N CounterFact edits at once, scores them with the shared harness, and
puts the original weights back. MEMIT and AlphaEdit by default as their authors set them up: key
covariance from >= 100,000 tokens of ordinary text (here text the model writes itself, cached),
keys and values over the prompt behind 20 model-written context prefixes, the KL term on
"{subject} is a"; --cov pool takes 4,000 texts of counterfact-train.json instead, --contexts 0 /
--kl 0 leave those parts out.
Results: bench/results/baseline_sweep-<N>[-<tag>].json, rewritten after every run (bench/update_readme.py
shows them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from megedit.baselines.config import FTConfig, MemitConfig
from megedit.methods import EditJob, get_method

HERE = Path(__file__).resolve().parent
CF = HERE.parents[1] / "shared/data/counterfact/counterfact-edit.json"
POOL = HERE.parents[1] / "shared/data/counterfact/counterfact-train.json"
FT_EPOCHS, FT_STOP = 25, 0.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--runs", default="memit:15000,memit:1000,alphaedit:10",
                        help="METHOD:WEIGHT[:FIRST-LAST] or ft:LR:LAYER[:BOX], comma-separated")
    parser.add_argument("--cov", choices=["generic", "pool"], default="generic",
                        help="key covariance from model-written text (generic) or the pool's prompts")
    parser.add_argument("--cov-tokens", type=int, default=120_000, help="--cov generic: tokens of text")
    parser.add_argument("--cov-texts", type=int, default=4000, help="--cov pool: texts")
    parser.add_argument("--contexts", type=int, default=20, help="context prefixes (MemitConfig.context_prefixes)")
    parser.add_argument("--kl", type=float, default=0.0625, help="MemitConfig.kl_factor")
    parser.add_argument("--tag", default="")
    return parser.parse_args()


def edit(run: str, model, tokenizer, requests, fmt, contexts: int, kl: float, covariance, seed: int = 0,
         checkpoint=None, layer: int | None = None):
    """(method, main weight or None, the edited model as a subject) for one run spec; MEMIT /
    AlphaEdit without a weight take MemitConfig's, a bare `ft` FTConfig's at `layer`. `covariance()`
    gives (texts, their source); `checkpoint`: FT's training state file, for a resume."""
    method = get_method(run.split(":")[0])
    weight, config = RUN_CONFIGS[method.config](run, contexts, kl, seed, layer)
    job = EditJob(model, tokenizer, requests, fmt, config, progress=False, checkpoint=checkpoint,
                  covariance_texts=lambda: covariance()[0])
    return method.name, weight, method.edit(job)


def ft_config(run: str, contexts: int, kl: float, seed: int = 0, layer: int | None = None):
    """(the learning rate, FTConfig) of an ft:LR:LAYER[:BOX] run spec: Adam, at most FT_EPOCHS
    epochs, stopped below FT_STOP; a bare `ft` is the paper's FT (FTConfig's defaults) at `layer`."""
    if ":" not in run:
        return None, FTConfig(layer=layer, seed=seed)
    _, lr, layer, *box = run.split(":")
    return float(lr), FTConfig(layer=int(layer), lr=float(lr), optimizer="adam", epochs=FT_EPOCHS, stop_loss=FT_STOP,
                               norm_constraint=float(box[0]) if box else None, seed=seed)


def memit_config(run: str, contexts: int, kl: float, seed: int = 0, layer: int | None = None):
    """(the main weight or None, MemitConfig) of a METHOD[:WEIGHT[:FIRST-LAST]] run spec (`layer`:
    not used, the span is the spec's)."""
    method, *rest = run.split(":")
    weight = float(rest[0]) if rest else None
    span = tuple(map(int, rest[1].split("-"))) if len(rest) > 1 else None
    config = MemitConfig(method=method, layers=tuple(range(span[0], span[1] + 1)) if span else None,
                         context_prefixes=contexts, kl_factor=kl, seed=seed,
                         **({} if weight is None else {get_method(method).main_setting: weight}))
    return weight, config.validate()


# a run spec's settings, by the settings class its method uses (megedit.methods: Method.config)
RUN_CONFIGS = {FTConfig: ft_config, MemitConfig: memit_config}


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    from megedit import evaluate, load_model, load_requests
    from megedit.baselines.generic_text import sampled_text
    from megedit.baselines.memit import pool_texts
    from megedit.data.prompts import get_format
    from result_schema import write_result

    model, tokenizer = load_model("smollm2", device="cpu")
    requests = load_requests("counterfact", CF, limit=args.limit)

    def covariance():  # only runs that need it pay for it
        if args.cov == "generic":
            return sampled_text(model, tokenizer, args.cov_tokens), f"{args.cov_tokens} tokens the model wrote"
        texts = pool_texts(load_requests("counterfact", POOL))[: args.cov_texts]
        return texts, f"{len(texts)} texts of counterfact:{POOL.name}"

    path = HERE / "results" / (f"baseline_sweep-{args.limit}" + (f"-{args.tag}" if args.tag else "") + ".json")
    rows = []
    for run in args.runs.split(","):
        start = time.perf_counter()
        method, weight, subject = edit(run, model, tokenizer, requests, get_format("raw"), args.contexts, args.kl,
                                       covariance)
        edit_s = time.perf_counter() - start
        report = evaluate(subject, requests, data_kind="counterfact", batch_size=64, progress=False)
        subject.restore()
        needs_covariance = get_method(method).needs_covariance
        settings = subject.settings | ({"cov_source": covariance()[1]} if needs_covariance else {})
        rows.append({"method": method, "weight": weight, "metrics": report.metrics, "score": report.score,
                     "edit_s": edit_s, "settings": settings})
        m = report.metrics
        print(f"{run}: Rel {m['reliability']['ag']:.1f}/{m['reliability']['tf']:.1f} "
              f"Gen {m['generality']['ag']:.1f}/{m['generality']['tf']:.1f} "
              f"Loc {m['locality']['ag']:.1f}/{m['locality']['tf']:.1f} Score {report.score:.2f} ({edit_s:.0f} s)",
              flush=True)
        write_result(path, {"n": len(requests), "data": f"counterfact:{CF.name}", "format": "raw", "seed": 0,
                            "threads": torch.get_num_threads(), "rows": rows},
                     model="smollm2", n=len(requests), seed=0, method=None, config=None, data={"edits": CF},
                     unknown={"method.name": "a sweep: each row names its method",
                              "method.config": "a sweep: each row holds its settings"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
