"""Stage A benchmarks on SmolLM2 + CounterFact.

    .venv/bin/python bench/fit_neurons.py speedup --limit 64      # naive loop vs batched fitter, side by side
    .venv/bin/python bench/fit_neurons.py scale --limit 1024      # the batched fitter at scale + fitted-vector eval
    .venv/bin/python bench/fit_neurons.py sweep --limit 64        # success / generality per layer
    .venv/bin/python bench/fit_neurons.py restart --limit 256     # stalled edits started again at a lower lr, or not
    .venv/bin/python bench/fit_neurons.py quiet --limit 128       # the neuron quiet on a chat's opening, or not
    .venv/bin/python bench/fit_neurons.py warm --limit 128        # edits started from a same-answer edit's vector, or not

The naive loop is the straightforward implementation: one edit at a time, a full forward pass
(all layers, LM head on every position) per step, torch's Adam on one vector, the same initial
vector, learning rate and step cap as the batched fitter. It is timed twice: with the batched
fitter's success test (so only the batching differs) and with the authors' test, a greedy
generation after every step. Results go to bench/results/fit_neurons-*.json; bench/update_readme.py shows them.

restart: stage A as MeGEditor runs it (the pool's paraphrases and the chat wording; the defaults) with and
without restarting stalled edits (FitConfig.restart_steps), one after the other in one process, on the first
--limit edits of each of bench/meg.py's sets (the CounterFact files both ways round, ZsRE): success, row-steps,
time, and the fitted vectors' own scores (each edit's vector on its own queries: reliability, generality,
locality; no chats).

quiet: the same, with the neuron acting on a chat's opening (system turn and user header) or quiet there
(FitConfig.quiet_chat_opening, the default), the fitted vectors' chat replies scored too.

warm: the same, every edit started from the initial vector or, when an earlier edit of its block has its
answer, from that edit's fitted vector (FitConfig.warm_start, the default).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
CF = HERE.parents[1] / "shared/data/counterfact/counterfact-edit.json"


def naive_fit(model, tokenizer, requests, fmt, config, check: str = "tf"):
    """One edit at a time, full forward each step. Returns (success flags, steps).

    check="tf": the batched fitter's success test, read off the same forward pass.
    check="generate": the authors' test, a greedy generation (at most 20 tokens) after every
    step that must equal the target.
    """
    from megedit.data.prompts import stop_tokens
    from megedit.eval.metrics import ag_match

    from megedit.neuron import attach_neuron
    from megedit.stages.fit_rows import row_loss_and_success

    neuron = attach_neuron(model, config.layer, config.variant)
    stops = stop_tokens(tokenizer)
    success, steps = [], []
    try:
        for r in requests:
            prompt = fmt.prompt_ids(r.prompt, tokenizer)
            answer = fmt.answer_ids(r.target, tokenizer, with_stop=True)
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([answer + [-100]])
            w = neuron.spec.initial_vector(config.init_seed).unsqueeze(0).requires_grad_(True)
            neuron.set_weights(w)
            optimiser = torch.optim.Adam([w], lr=config.lr)
            ok = False
            for step in range(config.max_steps + 1):
                logits = model(input_ids=ids).logits[:, -len(answer) - 1 :]
                loss, passed = row_loss_and_success(logits, labels, config.margin)
                if check == "generate":
                    with torch.no_grad():
                        out = model.generate(input_ids=ids[:, : len(prompt)], max_new_tokens=20, do_sample=False,
                                             eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)
                    passed = [ag_match(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True), r.target)]
                if bool(passed[0]) or step == config.max_steps:
                    ok = bool(passed[0])
                    break
                optimiser.zero_grad()
                loss.sum().backward()
                optimiser.step()
            success.append(ok)
            steps.append(step)
    finally:
        neuron.detach()
    return success, steps


def speedup(args, model, tokenizer, requests, fmt, config) -> dict:
    from megedit.stages.fit_neurons import fit_neurons

    start = time.perf_counter()
    batched = fit_neurons(model, tokenizer, requests, fmt, config, progress=False)
    batched_s = time.perf_counter() - start
    out = {"n": len(requests), "config": asdict(config),
           "batched": {"seconds": batched_s, "success_rate": batched.success_rate,
                       "mean_steps": float(batched.steps.float().mean())}}
    for check in args.naive_checks.split(","):
        start = time.perf_counter()
        success, steps = naive_fit(model, tokenizer, requests, fmt, config, check)
        seconds = time.perf_counter() - start
        out[f"naive_{check}"] = {"seconds": seconds, "success_rate": 100 * sum(success) / len(requests),
                                 "mean_steps": sum(steps) / len(steps), "speedup": seconds / batched_s}
        print(f"naive ({check} check) {seconds:.0f} s, {out[f'naive_{check}']['success_rate']:.1f}% success vs "
              f"batched {batched_s:.0f} s, {batched.success_rate:.1f}%: {seconds / batched_s:.1f}x")
    return out


def scale(args, model, tokenizer, requests, fmt, config) -> dict:
    from megedit.eval import evaluate
    from megedit.stages.fit_neurons import fit_neurons, fitted_subject

    work = HERE / "results" / "cases" / f"fit-work-{len(requests)}"
    result = fit_neurons(model, tokenizer, requests, fmt, config, progress=True, work_dir=work)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = result.timing["total_s"]
    subject = fitted_subject(model, tokenizer, result)
    report = evaluate(subject, requests, prompt_format=fmt, data_kind="counterfact", batch_size=64)
    subject.neuron.detach()
    summary = result.summary()
    out = {
        "n": len(requests), "config": asdict(config), "success_rate": summary["success_rate"],
        "median_steps": summary["median_steps"], "mean_steps": summary["mean_steps"], "failed": summary["failed"],
        "fit_s": seconds, "edits_per_s": len(requests) / seconds, "projected_10k_s": seconds * 10_000 / len(requests),
        "peak_rss_mb": peak_mb, "timing": result.timing, "fitted_vector_eval": {
            "metrics": report.metrics, "score": report.score, "protocol": report.protocol},
    }
    print(f"{len(requests)} edits: {summary['success_rate']:.1f}% in {seconds:.0f} s "
          f"({out['edits_per_s']:.2f} edits/s, peak RSS {peak_mb:.0f} MB)")
    print(report.table())
    return out


def sweep(args, model, tokenizer, requests, fmt, config) -> dict:
    """Layers already in the results file are kept, not refitted (the sweep is resumable)."""
    from megedit.stages.fit_neurons import sweep_layers

    path = HERE / "results" / f"fit_neurons-sweep-{args.limit}.json"
    rows = {r["layer"]: r for r in (payload(path)["rows"] if path.exists() else [])}
    todo = [int(x) for x in args.layers.split(",") if int(x) not in rows]
    for row in sweep_layers(model, tokenizer, requests, fmt, todo, config, progress=False):
        rows[row["layer"]] = row
    return {"n": len(requests), "config": asdict(config), "rows": [rows[k] for k in sorted(rows)]}


RESTART_SETS = ("counterfact", "counterfact-swap", "zsre")


def restart(args, model, tokenizer, requests, fmt, config) -> dict:
    """Per edit set, stage A with and without restarts (requests/fmt/config unused: each set brings its own)."""
    from megedit import MeGConfig

    fit = MeGConfig().fit
    return side_by_side(args, model, tokenizer, [(label, {"restart_steps": steps, "restart_lr": fit.restart_lr})
                                                 for label, steps in (("never", None), ("defaults", fit.restart_steps))],
                        chats=False)


def quiet(args, model, tokenizer, requests, fmt, config) -> dict:
    """Per edit set, stage A with the neuron acting on the chat opening or quiet there (the default), and the
    fitted vectors' chat replies."""
    return side_by_side(args, model, tokenizer, [("acts on the opening", {"quiet_chat_opening": False}),
                                                 ("defaults", {"quiet_chat_opening": True})], chats=True)


def warm(args, model, tokenizer, requests, fmt, config) -> dict:
    """Per edit set, stage A with every edit started from the initial vector or warm-started (the default), and
    the fitted vectors' chat replies."""
    return side_by_side(args, model, tokenizer, [("initial vector", {"warm_start": False}),
                                                 ("defaults", {"warm_start": True})], chats=True)


def side_by_side(args, model, tokenizer, arms: list[tuple[str, dict]], chats: bool) -> dict:
    """Stage A as MeGEditor runs it on the first --limit edits of each of bench/meg.py's sets, once per arm (its
    FitConfig changes), one after the other in one process: success, row-steps, rows and tokens run, time, and
    the fitted vectors' own scores (each edit's vector on its own queries; with `chats`, chat replies too)."""
    from dataclasses import replace

    from meg import SETTINGS

    from megedit import MeGConfig, MeGEditor, evaluate, load_requests
    from megedit.data.prompts import DEFAULT_FOR_KIND, get_format
    from megedit.stages.fit_neurons import fit_neurons, fitted_subject

    rows = []
    for name in RESTART_SETS:
        kind, path, _, pool_path = SETTINGS[name]
        edits = load_requests(kind, path, limit=args.limit, skip_invalid=True)
        pool = load_requests("counterfact", pool_path)
        editor = MeGEditor(model, tokenizer, MeGConfig(), progress=False)
        variants, fmt = editor.variants(edits, pool)[0], get_format(DEFAULT_FOR_KIND[kind])
        for label, changes in arms:
            fit_config = replace(editor.config.fit, **changes)
            start = time.perf_counter()
            result = fit_neurons(model, tokenizer, edits, fmt, fit_config, progress=False, variants=variants)
            seconds = time.perf_counter() - start
            subject = fitted_subject(model, tokenizer, result)
            report = evaluate(subject, edits, prompt_format=fmt, data_kind=kind, batch_size=64, progress=False,
                              chat_edits=len(edits) if chats else 0)
            subject.neuron.detach()
            summary, timing = result.summary(), result.timing
            rows.append({"edits": name, "n": len(edits), "arm": label, **changes, "seconds": seconds,
                         "success_rate": summary["success_rate"], "wordings_passed": summary["wordings_passed"],
                         "row_steps": int(result.steps.sum()), "capped": int((result.steps >= fit_config.max_steps).sum()),
                         "median_steps": summary["median_steps"], "trained_rows": timing["trained_rows"],
                         **{k: timing[k] for k in ("trained_tokens", "tested_tokens") if k in timing},
                         "fitted_vector_metrics": report.metrics, "fitted_vector_score": report.score,
                         "fitted_vector_chat": report.chat or None})
            print(json.dumps(rows[-1]), flush=True)
    return {"n": args.limit, "config": asdict(MeGConfig().fit), "rows": rows,
            "data": {name: f"{SETTINGS[name][0]}:{SETTINGS[name][1].name}, pool {SETTINGS[name][3].name}"
                     for name in RESTART_SETS}, "format": "each data kind's default",
            "files": {f"{name}-{role}": SETTINGS[name][k] for name in RESTART_SETS for role, k in (("edits", 1), ("pool", 3))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=("speedup", "scale", "sweep", "restart", "quiet", "warm"))
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--layer", type=int, default=24)
    parser.add_argument("--layers", default="4,8,12,16,20")
    parser.add_argument("--naive-checks", default="tf,generate",
                        help="success tests of the naive loop to time: tf (the batched one), generate (authors')")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.INFO)

    from megedit import load_model, load_requests, model_fingerprint
    from megedit.data.prompts import get_format
    from megedit.stages.fit_config import FitConfig

    model, tokenizer = load_model("smollm2", device="cpu")
    requests = load_requests("counterfact", CF, limit=args.limit)
    config = FitConfig(layer=args.layer)
    result = {"speedup": speedup, "scale": scale, "sweep": sweep, "restart": restart, "quiet": quiet, "warm": warm}[args.job](
        args, model, tokenizer, requests, get_format("raw"), config)
    result = {"data": f"counterfact:{CF.name}", "format": "raw", "config": asdict(config), **result,
              "model": "smollm2", "seed": config.init_seed, "threads": torch.get_num_threads()}
    path = write_result(HERE / "results" / f"fit_neurons-{args.job}-{args.limit}.json", result, model="smollm2",
                        fingerprint=model_fingerprint(model), n=len(requests), seed=config.init_seed,
                        method="meg stage A", config=result["config"], data=result.pop("files", {"edits": CF}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
