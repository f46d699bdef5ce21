"""Score the unedited model and the FT baseline on edit data, through the shared harness.

    .venv/bin/python bench/baselines.py --data counterfact --limit 1024
    .venv/bin/python bench/baselines.py --data zsre
    .venv/bin/python bench/baselines.py --data counterfact --limit 1024 --methods memit,alphaedit
    .venv/bin/python bench/baselines.py --limit 4096 --methods memit:2000:1-5 --contexts 0 --values-part 1/2 &
    .venv/bin/python bench/baselines.py --limit 4096 --methods memit:2000:1-5 --contexts 0 --values-part 2/2

The value search of MEMIT / AlphaEdit (about 4 s per edit on one thread) is the slow part of a
large run: --values-part I/K searches only the I-th of K slices of the edits into the shared
per-edit cache and scores nothing, so K processes (OMP_NUM_THREADS=1 each) split it; the run
without the flag then only solves and evaluates.

Each (data, N, method) result goes to bench/results/ as a summary JSON (metrics, protocol,
timing; the per-query cases go to bench/results/cases/, not tracked). A finished result is
not recomputed unless --force, so a killed run resumes with what is missing; a killed
evaluation resumes from its last minute, a killed FT from its last epoch. Run
bench/update_readme.py afterwards to refresh the README's tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
from baseline_sweep import edit, memit_config
from megedit.methods import WEIGHT_EDITORS, get_method
from result_names import tag
from result_schema import write_result

HERE = Path(__file__).resolve().parent
# the pseudo-edit pool of bench/meg.py: the specificity probes' wordings and, for memit / alphaedit with
# --cov pool, the key covariance's text (never the edits)
POOL = COV_SOURCE = HERE.parents[1] / "shared/data/counterfact/counterfact-train.json"
DATA = {
    "counterfact": ("counterfact", HERE.parents[1] / "shared/data/counterfact/counterfact-edit.json"),
    "zsre": ("zsre", HERE.parents[1] / "shared/data/zsre/zsre_mend_train-1k.json"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=DATA, default="counterfact")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--methods", default="none,ft",
                        help="any of none, ft, memit, alphaedit, or a run spec of bench/baseline_sweep.py "
                             "(ft:LR:LAYER[:BOX], memit:LAMBDA[:FIRST-LAST], alphaedit:A[:FIRST-LAST])")
    parser.add_argument("--contexts", type=int, default=20, help="memit / alphaedit: context prefixes")
    parser.add_argument("--kl", type=float, default=0.0625, help="memit / alphaedit: the KL term's weight")
    parser.add_argument("--cov", choices=["generic", "pool"], default="generic",
                        help="memit / alphaedit: key covariance from 120,000 tokens the model writes (cached) or the pool")
    parser.add_argument("--cov-texts", type=int, default=4000, help="memit / alphaedit with --cov pool: texts")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--specificity", type=int, default=3, metavar="K",
                        help="K specificity prompts per edit from the pool's probe wordings, as bench/meg.py (0: none)")
    parser.add_argument("--chat-edits", type=int, default=256, metavar="K", help="chat replies of the first K edits")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--eval-processes", type=int, default=1, metavar="K",
                        help="evaluate in K forked one-thread processes (megedit.parallel)")
    parser.add_argument("--values-part", type=part, default=None, metavar="I/K",
                        help="memit / alphaedit: only search the target values of the I-th of K slices, then stop")
    args = parser.parse_args()
    searches = value_search_configs(args.methods, args.contexts, args.kl, args.seed) if args.values_part else None
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.INFO)

    from megedit import evaluate, load_model, load_requests, model_fingerprint
    from megedit.baselines.generic_text import sampled_text
    from megedit.baselines.memit import pool_texts
    from megedit.data.prompts import DEFAULT_FOR_KIND, get_format
    from megedit.data.specificity import with_specificity

    kind, path = DATA[args.data]
    requests = load_requests(kind, path, limit=args.limit, skip_invalid=True)
    # the same probes as bench/meg.py: the pool's probe-half wordings (never the edits' own queries)
    requests = with_specificity(requests, load_requests("counterfact", POOL), args.specificity)
    fmt = get_format(DEFAULT_FOR_KIND[kind])
    model, tokenizer = load_model(args.model, device="cpu")
    fingerprint = model_fingerprint(model)  # of the base weights, before any method changes them

    def covariance():
        if args.cov == "generic":
            return sampled_text(model, tokenizer), "text the model wrote"
        return pool_texts(load_requests("counterfact", COV_SOURCE))[: args.cov_texts], f"counterfact:{COV_SOURCE.name}"

    if searches:
        return search_values_part(args.values_part, searches, model, tokenizer, requests, fmt)
    for spec in args.methods.split(","):
        method = spec.split(":")[0]
        name = f"baseline-{tag(args.data)}-{len(requests)}-{method}"
        target = args.out / f"{name}.json"
        if target.exists() and not args.force:
            print(f"{name}: done already ({target})")
            continue
        torch.manual_seed(args.seed)
        training = args.out / "cases" / f"{name}.ft-training.pt"  # FT's state after each epoch, for a resume
        subject, edit_s = edited_subject(spec, args, model, tokenizer, requests, fmt, covariance, training)
        report = evaluate(subject, requests, prompt_format=fmt, data_kind=kind, data_name=f"{kind}:{path.name}",
                          checkpoint=args.out / "cases" / f"{name}.partial.json",
                          processes=args.eval_processes, chat_edits=args.chat_edits)
        if hasattr(subject, "restore"):
            subject.restore()
        summary = report.to_dict()
        cases = summary.pop("cases")
        summary["edit_time_s"] = edit_s
        summary["seed"] = args.seed
        summary["machine"] = {"cpu_threads": torch.get_num_threads(), "eval_processes": args.eval_processes,
                              "torch": torch.__version__,
                              "python": platform.python_version()}
        (args.out / "cases").mkdir(parents=True, exist_ok=True)
        (args.out / "cases" / f"{name}.json").write_text(json.dumps(cases, indent=0))
        pool_covariance = method in WEIGHT_EDITORS and get_method(method).needs_covariance and args.cov == "pool"
        write_result(target, summary, model=args.model, fingerprint=fingerprint, n=len(requests), seed=args.seed,
                     method=method, config=summary["edit"],
                     data={"edits": path, "pool": POOL} | ({"covariance": COV_SOURCE} if pool_covariance else {}))
        training.unlink(missing_ok=True)
        print(report.table())
        print(f"{name}: edit {edit_s:.0f} s, eval {report.timing['total_s']:.0f} s -> {target}")
    return 0


def edited_subject(spec: str, args, model, tokenizer, requests, fmt, covariance, training: Path):
    """(the subject of one run spec, its edit seconds): the unedited model for "none", else the
    model its method edited; a method that resumes a killed edit (FT) counts its own time, with the
    killed runs' epochs, without reloading their state."""
    from megedit.eval import PlainSubject

    method = spec.split(":")[0]
    start = time.perf_counter()
    if method == "none":
        return PlainSubject(model, tokenizer), time.perf_counter() - start
    if method not in WEIGHT_EDITORS:
        raise SystemExit(f"unknown method {method!r}")
    subject = edit(spec, model, tokenizer, requests, fmt, args.contexts, args.kl, covariance, args.seed,
                   checkpoint=training, layer=args.layer)[2]
    edit_s = time.perf_counter() - start
    return subject, subject.settings["edit_time_s"] if get_method(method).resumes else edit_s


def part(text: str) -> tuple[int, int]:
    """"I/K" with 1 <= I <= K."""
    try:
        i, k = map(int, text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/K, got {text!r}") from None
    if not 1 <= i <= k:
        raise argparse.ArgumentTypeError(f"expected 1 <= I <= K, got {text!r}")
    return i, k


def value_search_configs(methods: str, contexts: int, kl: float, seed: int) -> list:
    """(spec, MemitConfig) per run spec for --values-part; checked before the model loads."""
    from megedit.baselines.config import METHODS

    for spec in methods.split(","):
        if spec.split(":")[0] not in METHODS:
            raise SystemExit(f"--values-part is for {' / '.join(METHODS)}, not {spec!r}")
    return [(spec, memit_config(spec, contexts, kl, seed)[1]) for spec in methods.split(",")]


def search_values_part(values_part: tuple[int, int], searches, model, tokenizer, requests, fmt) -> int:
    """Fill the value cache for one slice of the edits, for each (spec, config) of `searches`."""
    from megedit.baselines.memit import search_values

    i, k = values_part
    size = -(-len(requests) // k)
    chunk = requests[(i - 1) * size: i * size]
    for spec, config in searches:
        start = time.perf_counter()
        record = search_values(model, tokenizer, chunk, fmt, config)[3]
        print(f"{spec}: part {i}/{k} ({len(chunk)} edits), {record['values_reused_edits']} cached before, "
              f"searched in {time.perf_counter() - start:.0f} s, converged {100 * record['v_converged']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
