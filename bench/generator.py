"""Stage D on SmolLM2 + CounterFact: train the generators on the fitted vectors and apply what
they generate.

    .venv/bin/python bench/generator.py --limit 1024              # DiT (cpu preset) and MLP
    .venv/bin/python bench/generator.py --limit 1024 --kinds dit --train-steps 3500 --tag edm
    .venv/bin/python bench/generator.py --limit 1024 --kinds dit --prediction v \
        --dit '{"cond_dropout": 0.2, "cond_token": false}' --tag spec    # the spec's choices, CPU size
    .venv/bin/python bench/generator.py --limit 1024 --profile generator-dit-1024-edm,... --grid 1,2,5,10,50

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
`--profile` trains nothing: for saved DiT generators it records where 50-step sampling loses
the vector (`denoising_profile`), and the distance and RelAG of the vectors sampled with each
`--grid` step count, on the validation edits, in bench/results/denoising-profile-<N>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from result_schema import write_result

HERE = Path(__file__).resolve().parent
CF = HERE.parents[1] / "shared/data/counterfact/counterfact-edit.json"
CASES = HERE / "results" / "cases"


def generated_subject(model, tokenizer, spec, vectors_by_text: dict[str, torch.Tensor], method: str):
    """The LM with the neuron set, per query, to the vector generated for that query's text."""
    from megedit.runtime.subject import vector_table_subject

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


def denoising_profile(generator, cond: torch.Tensor, vectors: torch.Tensor, steps: int = 50, seed: int = 0) -> list[dict]:
    """Where sampling loses the vector: at each of the `steps` DDIM steps, the relative L2 error of the
    network's x0 (normalised units) along the sampling trajectory, and from x_t made of the true
    vector with fresh noise (what training sees). A trajectory error above the true-x_t one is
    error carried over from earlier steps; a true-x_t error above the pure-noise one (first
    step) is a network that reads x_t worse than it would by ignoring it."""
    diffusion, net = generator.diffusion, generator.net
    z = generator.normalize(vectors.float())
    scale = float(z.norm(dim=1).mean())
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 1))
    rows = []

    def record(t: int, x0: torch.Tensor) -> None:
        tt = torch.full((len(z),), t, dtype=torch.long)
        x_t = diffusion.add_noise(z, tt, noise)
        true_x0, _ = diffusion.x0_and_eps(x_t, tt, net(x_t, tt, cond))
        rows.append({"t": t, "alpha_bar": float(diffusion.alpha_bar[t]),
                     "trajectory_rel": float((x0 - z).norm(dim=1).mean()) / scale,
                     "true_xt_rel": float((true_x0 - z).norm(dim=1).mean()) / scale})

    with torch.no_grad():
        diffusion.sample(net, cond.float(), tuple(z.shape), steps, "ddim", torch.Generator().manual_seed(seed), record)
    return rows


def sampling_error(generator, cond: torch.Tensor, vectors: torch.Tensor, steps: int, validate) -> dict:
    """DDIM with `steps` steps on these edits: relative L2 distance to the fitted vectors (LM units),
    the Reliability AG of what it generates (`validate`), and the time per query."""
    start = time.perf_counter()
    generated = generator.generate(cond, steps=steps, sampler="ddim")
    ms = 1000 * (time.perf_counter() - start) / len(cond)
    rel = float(((generated - vectors).norm(dim=1) / vectors.norm(dim=1)).mean())
    return {"steps": steps, "rel_l2": rel, "ms_per_query": ms, **validate(generated)}


def provenance(model, n: int) -> dict:
    """What a result of this bench records beside its rows (bench/result_schema.py)."""
    from megedit import model_fingerprint

    return {"model": "smollm2", "fingerprint": model_fingerprint(model), "n": n, "seed": None,
            "method": "meg stage D (generator)", "config": None, "data": {"edits": CF},
            "unknown": {"seed": "each row's generator config holds its seed",
                        "method.config": "one generator config per row"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("--kinds", default="dit,mlp")
    parser.add_argument("--train-steps", type=int, default=None, help="default: GeneratorConfig's")
    parser.add_argument("--prediction", choices=("v", "x0", "edm"), default=None,
                        help="DiT target; default: GeneratorConfig's")
    parser.add_argument("--sigma-data", type=float, default=None, help="for --prediction edm")
    parser.add_argument("--dit", default="{}", help='DiT fields over the preset, as JSON, e.g. \'{"cond_dropout": 0}\'')
    parser.add_argument("--grid", default="10,50,1000", help="DiT sampling steps to compare")
    parser.add_argument("--grid-n", type=int, default=128, help="edits for the sampling-steps comparison")
    parser.add_argument("--tag", default="")
    parser.add_argument("--profile", default="", metavar="NAME,...",
                        help="instead of training: the denoising profile of these saved DiT generators (folders "
                             "under bench/results/cases) on the validation edits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.INFO)

    from megedit import load_model, load_requests
    from megedit.data.prompts import get_format
    from megedit.eval import evaluate
    from megedit.models import load_encoder
    from megedit.stages.encoder import load_encoder_delta
    from megedit.stages.fit_config import FitConfig
    from megedit.stages.fit_neurons import fit_neurons
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

    if args.profile:
        from megedit.stages.generator import Generator

        profiles = []
        for name in args.profile.split(","):
            generator = Generator.load(CASES / name / "generator.safetensors")
            profiles.append({"generator": name, "kind": generator.config.kind,
                             "config": dataclasses.asdict(generator.config), "network": generator.net.config.to_dict(),
                             "steps": generator.record.get("steps"),
                             "profile": denoising_profile(generator, prompt_emb[:64], fit.vectors[ok[:64]]),
                             "sampling": [sampling_error(generator, prompt_emb[:64], fit.vectors[ok[:64]], s, validate)
                                          for s in (int(x) for x in args.grid.split(","))]})
        path = write_result(HERE / "results" / f"denoising-profile-{args.limit}.json",
                            {"n_validation": min(64, len(ok)), "model": "smollm2", "data": f"counterfact:{CF.name}",
                             "sampler": "ddim, 50 steps, seed 0", "threads": torch.get_num_threads(),
                             "rows": profiles}, **provenance(model, min(64, len(ok))))
        print(f"wrote {path}")
        return 0
    results = {"n": len(requests), "n_fitted": len(ok), "fit_success": fit.success_rate, "spec": fit.spec.to_dict(),
               "encoder": str(delta.relative_to(HERE.parent)), "model": "smollm2", "data": f"counterfact:{CF.name}",
               "format": "raw", "rows": []}
    for kind in args.kinds.split(","):
        config = GeneratorConfig(kind=kind, dit=json.loads(args.dit), passes=None)  # the budget: train_steps
        if args.train_steps:
            config.train_steps = args.train_steps
        if args.prediction:
            config.prediction = args.prediction
        if args.sigma_data:
            config.sigma_data = args.sigma_data
        name = f"generator-{kind}-{args.limit}" + (f"-{args.tag}" if args.tag else "")
        generator = train_generator(prompt_emb, fit.vectors[ok], config, work_dir=CASES / name, validate=validate)
        generator.save(CASES / name / "generator.safetensors")
        row = {"kind": kind, "config": dataclasses.asdict(config), "network": generator.net.config.to_dict(),
               "training": generator.record,
               "eval": score(model, tokenizer, fit.spec, requests, generator, encoder, config.sample_steps, name)}
        if generator.diffusion is not None:  # sampled in steps: how the step count trades speed for accuracy
            row["steps_grid"] = [score(model, tokenizer, fit.spec, requests[: args.grid_n], generator, encoder, s, name)
                                 for s in (int(x) for x in args.grid.split(","))]
        results["rows"].append(row)
        m = row["eval"]["metrics"]
        print(f"{kind}: trained {generator.record['seconds']:.0f} s; RelAG {m['reliability']['ag']:.1f} "
              f"GenAG {m['generality']['ag']:.1f}")
    results["threads"] = torch.get_num_threads()
    path = write_result(HERE / "results" / (f"generator-{args.limit}" + (f"-{args.tag}" if args.tag else "") + ".json"),
                        results, **provenance(model, len(requests)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
