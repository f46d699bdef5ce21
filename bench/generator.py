"""Stage D on SmolLM2 + CounterFact: train the generators on the fitted vectors and apply what
they generate.

    .venv/bin/python bench/generator.py --limit 1024              # DiT (cpu preset) and MLP
    .venv/bin/python bench/generator.py --limit 1024 --kinds dit --train-steps 6000 --tag long

Needs the fitted vectors of `bench/fit_neurons.py scale --limit N` (restored from its work
folder, refitted if missing) and the tuned encoder of `bench/routing.py counterfact`. Each
generator is trained on the (prompt embedding, fitted vector) pairs of the successfully fitted
edits; during training, validation samples the first 64 edits and reports the L2 distance to
their fitted vectors and the Reliability AG of the generated vectors. Then every edit's prompt
gets the vector generated from the prompt's embedding and its first rephrase the vector
generated from the rephrase's embedding (no router here: this measures the generator alone),
scored by the evaluation harness (Reliability and Generality, AG and TF). For the DiT, the same
on the first `--grid-n` edits for 10 / 50 / 1000 sampling steps with the time per query.
Results: bench/results/generator-<N>[-tag].json (bench/update_readme.py shows them).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CF = HERE.parents[1] / "shared/data/counterfact/counterfact-edit.json"
CASES = HERE / "results" / "cases"


def generated_subject(model, tokenizer, spec, vectors_by_text: dict[str, torch.Tensor], method: str):
    """The LM with the neuron set, per query, to the vector generated for that query's text."""
    from megedit.eval.subject import vector_table_subject

    return vector_table_subject(model, tokenizer, spec, vectors_by_text, lambda q: q.text, method)


def score(model, tokenizer, spec, requests, generator, encoder, steps: int, label: str) -> dict:
    """Generate for every prompt and first rephrase, time it, and score Rel/Gen (AG, TF)."""
    from megedit.eval import evaluate

    scored = [dataclasses.replace(r, rephrases=r.rephrases[:1], locality=[]) for r in requests]
    texts = list(dict.fromkeys([r.prompt for r in scored] + [r.rephrases[0] for r in scored if r.rephrases]))
    cond = encoder.encode(texts)
    start = time.perf_counter()
    vectors = generator.generate(cond, steps=steps).cpu()
    per_query_ms = 1000 * (time.perf_counter() - start) / len(texts)
    subject = generated_subject(model, tokenizer, spec, dict(zip(texts, vectors)), label)
    try:
        report = evaluate(subject, scored, data_kind="counterfact", batch_size=64, progress=False)
    finally:
        subject.neuron.detach()
    return {"steps": steps, "n": len(scored), "generate_ms_per_query": per_query_ms, "metrics": report.metrics,
            "eval_s": report.timing["total_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("--kinds", default="dit,mlp")
    parser.add_argument("--train-steps", type=int, default=None, help="default: GeneratorConfig's")
    parser.add_argument("--grid", default="10,50,1000", help="DiT sampling steps to compare")
    parser.add_argument("--grid-n", type=int, default=128, help="edits for the sampling-steps comparison")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.INFO)

    from megedit import load_model, load_requests
    from megedit.data.prompts import get_format
    from megedit.eval import evaluate
    from megedit.io import atomic_write_json
    from megedit.models import load_encoder
    from megedit.stages.encoder import load_encoder_delta
    from megedit.stages.fit_neurons import FitConfig, fit_neurons
    from megedit.stages.generator import GeneratorConfig, train_generator

    model, tokenizer = load_model("smollm2", device="cpu")
    requests = load_requests("counterfact", CF, limit=args.limit)
    fit = fit_neurons(model, tokenizer, requests, get_format("raw"), FitConfig(layer=24),
                      work_dir=CASES / f"fit-work-{args.limit}")
    delta = CASES / "routing-counterfact" / "encoder.safetensors"
    if not delta.exists():
        print(f"{delta} is missing: run bench/routing.py counterfact first", file=sys.stderr)
        return 1
    encoder, _ = load_encoder_delta(delta, load_encoder("minilm"))
    ok = fit.success.nonzero().flatten()
    prompt_emb = encoder.encode([requests[i].prompt for i in ok.tolist()])
    val_requests = [dataclasses.replace(requests[i], rephrases=[], locality=[]) for i in ok[:64].tolist()]

    def validate(generated: torch.Tensor) -> dict:
        subject = generated_subject(model, tokenizer, fit.spec, dict(zip([r.prompt for r in val_requests], generated)),
                                    "validation")
        try:
            report = evaluate(subject, val_requests, data_kind="counterfact", batch_size=64, progress=False)
        finally:
            subject.neuron.detach()
        return {"rel_ag": report.metrics["reliability"]["ag"]}

    results = {"n": len(requests), "n_fitted": len(ok), "fit_success": fit.success_rate, "spec": fit.spec.to_dict(),
               "encoder": str(delta.relative_to(HERE.parent)), "model": "smollm2", "data": f"counterfact:{CF.name}",
               "format": "raw", "rows": []}
    for kind in args.kinds.split(","):
        config = GeneratorConfig(kind=kind)
        if args.train_steps:
            config.train_steps = args.train_steps
        name = f"generator-{kind}-{args.limit}" + (f"-{args.tag}" if args.tag else "")
        generator = train_generator(prompt_emb, fit.vectors[ok], config, work_dir=CASES / name, validate=validate)
        generator.save(CASES / name / "generator.safetensors")
        row = {"kind": kind, "config": dataclasses.asdict(config), "network": generator.net.config.to_dict(),
               "training": generator.record,
               "eval": score(model, tokenizer, fit.spec, requests, generator, encoder, config.sample_steps, name)}
        if kind == "dit":
            row["steps_grid"] = [score(model, tokenizer, fit.spec, requests[: args.grid_n], generator, encoder, s, name)
                                 for s in (int(x) for x in args.grid.split(","))]
        results["rows"].append(row)
        m = row["eval"]["metrics"]
        print(f"{kind}: trained {generator.record['seconds']:.0f} s; RelAG {m['reliability']['ag']:.1f} "
              f"GenAG {m['generality']['ag']:.1f}")
    results["threads"] = torch.get_num_threads()
    path = atomic_write_json(HERE / "results" / (f"generator-{args.limit}" + (f"-{args.tag}" if args.tag else "")
                                                 + ".json"), results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
