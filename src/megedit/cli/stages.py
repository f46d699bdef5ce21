"""The stage verbs, for studying one stage at a time: fit-neurons (A), sweep-layers (A at each
layer), fit-router (B and C)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .common import add_data_args, add_model_args, add_processes_arg, add_verb, load_data, load_lm, load_pool
from .options import add_fit_flags, add_routing_flags, fit_config, routing_config
from .types import device, layer_list


def add_fit_neurons(sub) -> None:
    p = add_verb(
        sub, "fit-neurons", "stage A alone: fit one neuron vector per edit",
        "Fit one neuron vector per edit (frozen LM, batched, resumable with --work-dir). "
        "With --eval, score the fitted vectors applied to their own edits' queries.",
    )
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None, help="0-based layer (default: 80%% of the depth, 24 on SmolLM2)")
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="pseudo-edit pool whose wordings are fitted with each prompt (default: the prompt alone)")
    p.add_argument("--out", type=Path, required=True, help="where to write the vectors (.safetensors + .json)")
    p.add_argument("--work-dir", type=Path, default=None, help="shards for resuming a killed run")
    p.add_argument("--part", default=None, metavar="K/N",
                   help="fit only part K of N (1-based) into --work-dir, for N processes or machines sharing it")
    add_processes_arg(p)
    p.add_argument("--eval", action="store_true", help="also score the fitted vectors (upper bound of MeG)")
    add_fit_flags(p)
    p.set_defaults(run=run_fit_neurons)


def _parse_part(text: str | None) -> tuple[int, int] | None:
    """'K/N' (1-based, as people count) -> (K-1, N)."""
    if text is None:
        return None
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ConfigError(f"--part: expected K/N with 1 <= K <= N, found {text!r}")
    return int(k) - 1, int(n)


def _variants(args, model, tokenizer, config, requests, kind, path):
    """Each edit's wordings (prompt + pool paraphrases / prefixes), as MeGEditor builds them."""
    from ..config import MeGConfig
    from ..editor import MeGEditor

    _, pool = load_pool(args, kind, path)
    editor = MeGEditor(model, tokenizer, MeGConfig(layer=args.layer, fit=config, seed=config.init_seed))
    variants, record = editor.variants(requests, pool)
    print(f"wordings per edit: {record['mean_wordings']:.2f} ({record['edits_with_paraphrases']} edits with pool paraphrases)")
    return variants


def run_fit_neurons(args) -> int:
    from ..parallel import ranks
    from ..stages.fit_neurons import fit_neurons

    part = _parse_part(args.part)
    if args.processes > 1 and (args.work_dir is None or part is not None):
        raise ConfigError("--processes needs --work-dir (its parts write their shards there) and no --part")
    kind, path, requests, fmt = load_data(args)
    config = fit_config(args, args.layer)
    model, tokenizer = load_lm(args)
    variants = _variants(args, model, tokenizer, config, requests, kind, path) if args.pseudo else None
    result = fit_neurons(model, tokenizer, requests, fmt, config, progress=args.progress,
                         work_dir=args.work_dir, part=part, variants=variants, processes=args.processes)
    if ranks()[0] != 0:  # under a launcher every rank holds the collected result; rank 0 writes it
        if args.eval:
            _eval_fitted(args, model, tokenizer, result, requests, fmt, kind, path)  # the ranks share the decoding
        return 0
    result.save(args.out)
    s = result.summary()
    print(f"fitted {s['n']} edits at layer {result.spec.layer}: success {s['success_rate']:.1f}%, median steps "
          f"{s['median_steps']}, {result.timing['total_s']:.0f} s ({s['n'] / result.timing['total_s']:.2f} edits/s)"
          f" -> {args.out}")
    if args.eval:
        _eval_fitted(args, model, tokenizer, result, requests, fmt, kind, path)
    return 0


def _eval_fitted(args, model, tokenizer, result, requests, fmt, kind, path) -> None:
    from ..eval import evaluate
    from ..parallel import ranks
    from ..stages.fit_neurons import fitted_subject

    mine = set(result.case_ids)  # with --part, this process's edits only
    requests = [r for r in requests if r.case_id in mine]
    report = evaluate(fitted_subject(model, tokenizer, result), requests, prompt_format=fmt, data_kind=kind,
                      data_name=f"{kind}:{path.name}", progress=args.progress,
                      checkpoint=args.out.with_suffix(".eval.partial.json"))
    if ranks()[0] == 0:
        report.save(args.out.with_suffix(".eval.json"))
        print(report.table())


def add_sweep_layers(sub) -> None:
    p = add_verb(
        sub, "sweep-layers", "fit a sample of edits at each layer and compare",
        "Fit the same edits at each candidate layer; report success rate, steps, time and the "
        "fitted vectors' Reliability / Generality / Locality.",
    )
    add_data_args(p, "edits to fit per layer")
    add_model_args(p)
    p.add_argument("--layers", type=layer_list, default="2,4,6,8,10,12,14,16,18,20,22,24,26",
                   help="comma-separated 0-based layers")
    p.add_argument("--json", type=Path, default=None, help="write the rows and the settings here")
    add_fit_flags(p)
    p.set_defaults(run=run_sweep_layers, limit=64)


def run_sweep_layers(args) -> int:
    from ..eval.report import markdown_table
    from ..io import atomic_write_json
    from ..stages.fit_neurons import sweep_layers

    kind, path, requests, fmt = load_data(args)
    config = fit_config(args, args.layers[0])
    model, tokenizer = load_lm(args)
    rows = sweep_layers(model, tokenizer, requests, fmt, args.layers, config, args.progress)
    table = [[str(r["layer"]), f"{r['success_rate']:.1f}", f"{r['median_steps']}", f"{r['fit_s']:.0f}"]
             + [f"{r['metrics'][k][s]:.1f}" for k in ("reliability", "generality", "locality") for s in ("ag", "tf")]
             for r in rows]
    print(markdown_table(["layer", "success %", "median steps", "fit s", "RelAG", "RelTF", "GenAG", "GenTF",
                          "LocAG", "LocTF"], table))
    if args.json:
        atomic_write_json(args.json, {"data": f"{kind}:{path.name}", "n": len(requests), "format": fmt.to_dict(),
                                      "config": vars(args) | {"run": None, "json": str(args.json)}, "rows": rows})
    return 0


def add_fit_router(sub) -> None:
    p = add_verb(
        sub, "fit-router", "stages B and C: tune the encoder, train and calibrate the router",
        "Tune the sentence encoder on a pseudo-edit pool (InfoNCE), train the familiarity router "
        "on the edit prompts, choose epsilon on the pool, and report paraphrase retrieval and routing on the "
        "edits' own queries. Writes encoder.safetensors, router.safetensors, routing.json and router-distance.png.",
    )
    add_data_args(p, "edit the first N records", formats=False)
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="pseudo-edit pool (default: the records of --data after the edited ones)")
    p.add_argument("--encoder", default="minilm", help="'minilm' (embedded), a local folder or a hub id")
    p.add_argument("--device", type=device, default="auto", metavar="DEVICE",
                   help="where the encoder runs: cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--seed", type=int, default=0, help="the pool split, the encoder's order and the router's seed")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_routing_flags(p)
    p.set_defaults(run=run_fit_router)



def run_fit_router(args) -> int:
    from ..io import atomic_write_json
    from ..editor import usable_pool
    from ..models import load_encoder
    from ..stages.encoder import save_encoder_delta
    from ..stages.routing import fit_routing, routing_report
    from .common import check_device

    kind, path, requests, _ = load_data(args)
    pool, pool_name = usable_pool(requests, *reversed(load_pool(args, kind, path)))
    config = routing_config(args, args.seed)
    base = load_encoder(args.encoder, device=check_device(args.device))
    routing = fit_routing(requests, pool, base, config, progress=args.progress)
    report = routing_report(routing, base, requests)
    save_encoder_delta(routing.encoder, routing.encoder_training, args.encoder, args.out / "encoder.safetensors")
    routing.router.save(args.out / "router.safetensors")
    distances = report.pop("distances")
    atomic_write_json(args.out / "routing.json", {"data": f"{kind}:{path.name}", "limit": args.limit, "pool": pool_name,
                                                  **report, **routing.record})
    _routing_plot(args, config, routing, distances, kind, path, len(requests))
    r, s = report["retrieval_top1"], report["routing"]
    print(f"paraphrase retrieval top-1 among {r['n']} edit prompts: frozen {r['frozen']:.1f}%, tuned {r['tuned']:.1f}%")
    print(f"epsilon {routing.router.epsilon:.3f}: routed familiar: prompts {s['prompt']['familiar']:.1f}%, "
          f"rephrases {s['rephrase']['familiar']:.1f}%, locality {s['locality']['familiar']:.1f}% "
          f"({routing.record['timing']['total_s']:.0f} s) -> {args.out}")
    return 0


def _routing_plot(args, config, routing, distances, kind, path, n) -> None:
    from ..plots import router_histogram
    from ..stages.router import router_kind

    xlabel = router_kind(config.router.kind).distance_label(config.router)
    router_histogram(distances, routing.router.epsilon, config.router.max_distance, xlabel,
                     args.out / "router-distance.png", title=f"{kind}:{path.name}, N={n}, {config.router.kind} router")
