"""MeG end to end on the benchmark sets with SmolLM2 (or --model): fit (stages A-D), evaluate with
the shared harness, and measure the inference cost against the unedited model on the same queries.

    .venv/bin/python bench/meg.py counterfact      # first 1,024 CounterFact edits, pool counterfact-train
    .venv/bin/python bench/meg.py zsre             # the ZsRE edits (malformed records skipped), same pool
    .venv/bin/python bench/meg.py counterfact --limit 4096 --no-speed   # a point of bench/scale_curve.py
    .venv/bin/python bench/meg.py counterfact --exclude all   # no variant uses a wording of a test rephrase
    .venv/bin/python bench/meg.py counterfact-swap            # edits from counterfact-train, pool counterfact-edit
    .venv/bin/python bench/meg.py counterfact --model gemma3-270m --limit 256 --no-speed   # the second embedded model

Stages are cached in bench/results/cases/meg-<setting>[-<generator>]/, one folder for every N, so
a larger run reuses what does not depend on the edits (the tuned encoder), and a killed run
resumes; the evaluation goes to eval[-<N>].json there. The inference
cost: greedy answers (up to 20 tokens) for the first `--speed-n` edits' prompt, rephrase and
locality query, with the edited model and with the base model (the neuron taken off), in
alternating rounds in one process; queries per second of each and the share of the edited
model's time spent routing and generating neuron vectors.
Stages cached for one model never serve another (their keys hold the model's fingerprint); the
encoder (stage B) depends on the pool alone and is shared.
Results: bench/results/meg-<cf|zs>[-<N> when not the default][-<model> when not smollm2][-<generator> when not mlp].json
(bench/update_readme.py shows them beside the baselines); the JSON's "model" names the base model.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import torch
from result_names import tag
from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data"
CF_EDIT, CF_TRAIN = SHARED / "counterfact/counterfact-edit.json", SHARED / "counterfact/counterfact-train.json"
SETTINGS = {  # data kind, edits, default N, pseudo-edit pool
    "counterfact": ("counterfact", CF_EDIT, 1024, CF_TRAIN),
    "counterfact-swap": ("counterfact", CF_TRAIN, 1024, CF_EDIT),  # the two files' roles swapped
    "zsre": ("zsre", SHARED / "zsre/zsre_mend_train-1k.json", None, CF_TRAIN),
}


def speed(edited, requests, rounds: int) -> dict:
    """Queries per second, edited vs unedited, on the same queries, alternating rounds."""
    from megedit.eval import PlainSubject
    from megedit.eval.runner import build_queries
    from megedit.runtime.decoding import DecodeSettings, run_queries

    queries = [q for qs in build_queries(requests).values() for q in qs]
    fmt = edited.prompt_format
    ids = [fmt.prompt_ids(q.text, edited.tokenizer) for q in queries]
    settings, empty = DecodeSettings(fmt, 20, 32), [[] for _ in queries]
    base = PlainSubject(edited.model, edited.tokenizer)
    seconds, tokens = {"edited": 0.0, "base": 0.0}, {"edited": 0, "base": 0}
    edited.stats = dict.fromkeys(edited.stats, 0)
    for _ in range(rounds):
        for name in ("base", "edited"):
            if name == "base":
                edited.neuron.detach()
            start = time.perf_counter()
            with torch.inference_mode():
                out = run_queries(edited if name == "edited" else base, queries, ids, empty, settings, False, name)
            seconds[name] += time.perf_counter() - start
            tokens[name] += sum(len(g) for g in out.generated)
            if name == "base":
                edited.neuron.attach()
    qps = {k: rounds * len(queries) / v for k, v in seconds.items()}
    return {"n_queries": len(queries), "rounds": rounds, "max_new_tokens": 20, "batch_size": 32,
            "qps_edited": qps["edited"], "qps_base": qps["base"], "ratio": qps["edited"] / qps["base"],
            # edited answers are often shorter (the new target, then a newline): tokens/s compares equal work
            "tokens_per_s_edited": tokens["edited"] / seconds["edited"], "tokens_per_s_base": tokens["base"] / seconds["base"],
            "token_ratio": (tokens["edited"] / seconds["edited"]) / (tokens["base"] / seconds["base"]),
            "route_share": edited.stats["route_s"] / seconds["edited"],
            "generate_share": edited.stats["generate_s"] / seconds["edited"],
            "familiar_share": edited.stats["familiar"] / max(1, edited.stats["queries"])}


def settings(pairs: list[str], base: dict) -> dict:
    """`base` with each KEY=VALUE (dotted key, YAML value) set in it, as MeGConfig.from_dict takes it."""
    import yaml

    out = dict(base)
    for pair in pairs:
        key, _, value = pair.partition("=")
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--model", default="smollm2",
                        help="base model: smollm2 (embedded, default), gemma3-270m (embedded, optional), a folder or a hub id")
    parser.add_argument("--generator", default=None, help="generator kind (default: MeGConfig's; others get their own files)")
    parser.add_argument("--limit", type=int, default=None, help="first N edits (default: the setting's)")
    parser.add_argument("--train-steps", type=int, default=None, help="the generator's training steps (default: MeGConfig's)")
    parser.add_argument("--passes", type=float, default=None, help="the generator's budget in passes per edit")
    parser.add_argument("--width", type=int, default=None, help="the MLP generator's hidden width")
    parser.add_argument("--score-first", type=int, default=None, metavar="K",
                        help="all N edits applied, only the first K scored (a cheaper read of a sweep point)")
    parser.add_argument("--speed-n", type=int, default=128, help="edits whose queries time the inference")
    parser.add_argument("--no-speed", action="store_true", help="skip the inference timing")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--exclude", default="none", choices=["none", "own", "all"],
                        help="benchmark only: keep the wordings of the evaluated rephrases out of every edit's variants "
                             "(own: each edit's own; all: every edit's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, metavar="K",
                        help="stage A and the evaluation in K forked one-thread processes (megedit.parallel)")
    parser.add_argument("--reuse-eval", action="store_true", help="keep the saved evaluation, re-time inference")
    parser.add_argument("--specificity", type=int, default=3, metavar="K",
                        help="K specificity prompts per edit from the pool's probe wordings (0: none)")
    parser.add_argument("--chat-edits", type=int, default=256, metavar="K", help="chat replies of the first K edits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a MeGConfig setting by its dotted name, e.g. routing.router.negatives=0 (repeatable; "
                             "the result file names them)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.INFO)

    from megedit import EvalReport, MeGConfig, MeGEditor, evaluate, load_model, load_requests, model_fingerprint
    from megedit.data.prompts import DEFAULT_FOR_KIND
    from megedit.data.specificity import with_specificity

    kind, path, limit, pool_path = SETTINGS[args.setting]
    suffix = "" if args.limit in (None, limit) else f"-{args.limit}"
    limit = args.limit or limit
    requests = load_requests(kind, path, limit=limit, skip_invalid=True)
    pool = load_requests("counterfact", pool_path)
    requests = with_specificity(requests, pool, args.specificity)  # the pool's probe-half wordings
    model, tokenizer = load_model(args.model, device="cpu")
    if args.model != "smollm2":  # its own result and evaluation files
        suffix += "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", args.model.rstrip("/")).strip("-.")
    config = MeGConfig.from_dict(settings(args.set, {"prompt_format": DEFAULT_FOR_KIND[kind], "seed": args.seed}))
    suffix += "".join(f"-{key.rsplit('.', 1)[-1]}{value}" for key, value in (s.split("=", 1) for s in args.set))
    default_kind = config.generator.kind
    config.generator.kind = args.generator or default_kind
    if args.exclude != "none":
        config.fit.exclude_eval_templates = args.exclude
        suffix += f"-exclude-{args.exclude}"
    generator = "" if config.generator.kind == default_kind else f"-{config.generator.kind}"
    if args.train_steps is not None:  # its own result and evaluation files
        config.generator.train_steps, config.generator.passes = args.train_steps, None
        suffix += f"-steps{args.train_steps}"
    if args.passes is not None:
        config.generator.passes = args.passes
        suffix += f"-passes{args.passes:g}"
    if args.width is not None:
        config.generator.mlp = {**config.generator.mlp, "hidden": args.width}
        suffix += f"-width{args.width}"
    scored = requests[: args.score_first] if args.score_first else requests
    if args.score_first:
        suffix += f"-scored{len(scored)}"
    result = HERE / "results" / f"meg-{tag(args.setting)}{suffix}{generator}.json"
    # one work folder per setting: every stage's cache key holds its settings, so generator kinds share stages A-C
    work = HERE / "results" / "cases" / f"meg-{args.setting}"
    edited = MeGEditor(model, tokenizer, config, processes=args.processes).fit(requests, work, pool,
                                                                                f"counterfact:{pool_path.name}")
    saved = work / f"eval{suffix}{generator}.json"
    if args.reuse_eval and saved.exists():  # re-measure only the inference cost
        report = EvalReport.load(saved)
    else:
        report = evaluate(edited, scored, prompt_format=config.prompt_format, data_kind=kind,
                          data_name=f"{kind}:{path.name}", processes=args.processes,
                          checkpoint=work / f"eval{suffix}{generator}.partial.json", chat_edits=args.chat_edits)
        report.save(saved)
    print(report.table())
    cost = None if args.no_speed else speed(edited, requests[: args.speed_n], args.rounds)
    if cost:
        print(f"inference: edited {cost['qps_edited']:.1f} q/s, base {cost['qps_base']:.1f} q/s "
              f"(ratio {cost['ratio']:.2f}; tokens/s ratio {cost['token_ratio']:.2f}); routing "
              f"{100 * cost['route_share']:.1f}%, generator {100 * cost['generate_share']:.1f}% of the edited model's time")
    summary = {k: v for k, v in report.to_dict().items() if k != "cases"}
    summary |= {"setting": args.setting, "pool": f"counterfact:{pool_path.name}", "seed": args.seed,
                "edits_applied": len(requests),
                "config": config.to_dict(), "fit": edited.record, "inference": cost, "threads": torch.get_num_threads(),
                "processes": args.processes}
    if args.reuse_eval and result.exists():  # the stages were loaded from cache: keep the record of the real fit
        summary["fit"] = payload(result)["fit"]
    summary["fit"].pop("routing", None)
    summary["fit"]["generator"] = {k: v for k, v in summary["fit"]["generator"].items() if k != "history"}
    write_result(result, summary, model=args.model, fingerprint=model_fingerprint(model), n=summary["n"],
                 seed=args.seed, method="meg", config=summary["config"], data={"edits": path, "pool": pool_path})
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
