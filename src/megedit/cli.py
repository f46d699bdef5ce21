"""The `megedit` command: one verb per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .cli_types import layer_list, positive_int

log = logging.getLogger("megedit")

METHODS = ("none", "ft", "memit", "alphaedit")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a method on edit data (Rel/Gen/Loc x AG/TF + Score)",
        description="Edit N facts with a method (or none) and score the result with the shared harness. "
        "Writes the eval JSON (metrics, protocol, timing, one row per query) with --json.",
    )
    p.add_argument("pack", type=Path, nargs="?", default=None,
                   help="an edit pack folder (MeG; the base model is the one the pack names unless --model)")
    p.add_argument("--method", choices=METHODS, default="none",
                   help="none: the unedited model; ft: fine-tuning; memit / alphaedit: batch weight editing")
    _add_data_args(p, "edit the first N records")
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose MLP the method edits (ft; default: where MeG's neuron goes, 24 on SmolLM2)")
    p.add_argument("--layers", type=layer_list, default=None,
                   help="memit / alphaedit: comma-separated layers (default 4..8 on SmolLM2)")
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="memit / alphaedit: text for the key covariance (prompts, rephrases, locality prompts of "
                   "these records; default: the records of --data after the edited ones)")
    p.add_argument("--cov-texts", type=int, default=4000, help="memit / alphaedit: at most this many covariance texts")
    p.add_argument("--lr", type=float, default=None, help="ft learning rate")
    p.add_argument("--epochs", type=int, default=None, help="ft epochs")
    p.add_argument("--save-edit", type=Path, default=None, help="ft / memit / alphaedit: save the weight deltas here")
    p.add_argument("--load-edit", type=Path, default=None, help="evaluate saved weight deltas instead of editing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=positive_int, default=20)
    p.add_argument("--json", type=Path, default=None,
                   help="write the eval JSON here (a killed run resumes from JSON.partial beside it)")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from .eval import PlainSubject, evaluate
    from .models import load_model

    kind, path, requests, fmt = _load_data(args)
    if args.pack is not None and (args.method != "none" or args.load_edit):
        from .errors import ConfigError

        raise ConfigError("eval: give an edit pack, or --method / --load-edit, not both")
    if args.pack is not None:
        from .cli_meg import load_pack

        subject = load_pack(args.pack, args.model)
        fmt = subject.prompt_format
    else:
        model, tokenizer = load_model(args.model)
        subject = PlainSubject(model, tokenizer)
    if args.load_edit is not None:
        from .eval.subject import WeightEditSubject

        subject = WeightEditSubject.load(args.load_edit, model, tokenizer)
    elif args.method != "none" and args.pack is None:
        subject = _weight_edit(args, model, tokenizer, requests, fmt, kind, path)
        if args.save_edit:
            subject.save(args.save_edit)
    start = time.perf_counter()
    report = evaluate(subject, requests, prompt_format=fmt, data_kind=kind, data_name=f"{kind}:{path.name}",
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=args.progress,
                      checkpoint=args.json and args.json.with_name(args.json.name + ".partial"))
    log.info("evaluated %d edits in %.0f s", len(requests), time.perf_counter() - start)
    print(report.table())
    print(f"N={report.n}  data={report.data}  model={report.model}  format={fmt.name}  seed={args.seed}")
    if args.json:
        report.save(args.json)
        print(f"wrote {args.json}")
    return 0


def _weight_edit(args, model, tokenizer, requests, fmt, kind, path):
    """Edit the model's weights with a baseline (ft, memit, alphaedit)."""
    if args.method == "ft":
        from .arch import resolve_layer
        from .baselines.ft import FTConfig, fine_tune

        overrides = {k: v for k, v in (("lr", args.lr), ("epochs", args.epochs)) if v is not None}
        config = FTConfig(layer=resolve_layer(model, args.layer), seed=args.seed, **overrides)
        log.info("fine-tuning layer %d on %d edits", config.layer, len(requests))
        return fine_tune(model, tokenizer, requests, fmt, config, progress=args.progress)
    from .baselines.memit import MemitConfig, batch_edit, pool_texts

    layers = tuple(args.layers) if args.layers else None
    pool_name, pool = _load_pool(args, kind, path)
    texts = pool_texts(pool)[: args.cov_texts]
    log.info("%s: %d edits, key covariance from %d texts of %s", args.method, len(requests), len(texts), pool_name)
    return batch_edit(model, tokenizer, requests, fmt, texts, MemitConfig(method=args.method, layers=layers, seed=args.seed),
                      progress=args.progress)


def _add_data_args(p, limit_help: str = "use the first N records", lm: bool = True) -> None:
    if lm:
        p.add_argument("--model", default=None, help="'smollm2' (embedded, the default), a local folder or a hub id")
    p.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="edit data, e.g. counterfact:../shared/data/counterfact/counterfact-edit.json")
    p.add_argument("--limit", type=positive_int, default=None, help=limit_help)
    p.add_argument("--offset", type=int, default=0, help="skip this many records first")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out malformed records (with a warning) instead of stopping")
    if lm:
        p.add_argument("--format", dest="prompt_format", choices=("raw", "qa", "chat"), default=None,
                       help="prompt wrapping (default: raw for CounterFact, qa for ZsRE)")


def _load_data(args):
    from .data import load_requests, parse_data_arg
    from .data.prompts import DEFAULT_FOR_KIND, get_format

    if hasattr(args, "model") and args.model is None and getattr(args, "pack", None) is None:
        args.model = "smollm2"  # the default, unless an edit pack names its own base model
    kind, path = parse_data_arg(args.data)
    requests = load_requests(kind, path, limit=args.limit, offset=args.offset, skip_invalid=args.skip_invalid)
    return kind, path, requests, get_format(getattr(args, "prompt_format", None) or DEFAULT_FOR_KIND[kind])


def _load_pool(args, kind: str, path: Path):
    """The pseudo-edit pool: --pseudo, else the records of --data after the edited ones."""
    from .data import load_requests, parse_data_arg

    if args.pseudo:
        pool_kind, pool_path = parse_data_arg(args.pseudo)
        return f"{pool_kind}:{pool_path.name}", load_requests(pool_kind, pool_path, skip_invalid=args.skip_invalid)
    if args.limit is None:
        from .errors import ConfigError

        raise ConfigError("no pseudo-edit pool: give --pseudo KIND:PATH, or --limit so the records after the "
                          "edited ones form the pool")
    start = args.offset + args.limit
    return f"{kind}:{path.name} records {start}..", load_requests(kind, path, offset=start, skip_invalid=args.skip_invalid)


def _add_fit_args(p) -> None:
    # defaults (None here) are FitConfig's
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="default adam")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None, help="edits fitted side by side")
    p.add_argument("--margin", type=float, default=None, help="logit margin the success test asks for")
    p.add_argument("--paraphrases", type=int, default=None, help="pool paraphrases fitted per edit (needs --pseudo)")
    p.add_argument("--prefixes", type=int, default=None, help="context-prefixed prompts fitted per edit (needs --pseudo)")
    p.add_argument("--variant", choices=("linear", "activated", "gated"), default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the common initial vector (default 0)")


def _fit_config(args, layer: int):
    from .stages.fit_neurons import FitConfig

    given = {"variant": args.variant, "optimizer": args.optimizer, "lr": args.lr, "max_steps": args.max_steps,
             "batch_size": args.batch_size, "margin": args.margin, "init_seed": args.seed,
             "paraphrases": args.paraphrases, "prefixes": args.prefixes}
    return FitConfig(layer=layer, **{k: v for k, v in given.items() if v is not None})


def _add_fit_neurons(sub) -> None:
    p = sub.add_parser(
        "fit-neurons", help="stage A alone: fit one neuron vector per edit",
        description="Fit one neuron vector per edit (frozen LM, batched, resumable with --work-dir). "
        "With --eval, score the fitted vectors applied to their own edits' queries.",
    )
    _add_data_args(p)
    p.add_argument("--layer", type=int, default=None, help="0-based layer (default: 80%% of the depth, 24 on SmolLM2)")
    _add_fit_args(p)
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="pseudo-edit pool whose wordings are fitted with each prompt (default: the prompt alone)")
    p.add_argument("--out", type=Path, required=True, help="where to write the vectors (.safetensors + .json)")
    p.add_argument("--work-dir", type=Path, default=None, help="shards for resuming a killed run")
    p.add_argument("--part", default=None, metavar="K/N",
                   help="fit only part K of N (1-based) into --work-dir, for N processes or machines sharing it")
    p.add_argument("--eval", action="store_true", help="also score the fitted vectors (upper bound of MeG)")
    p.set_defaults(run=_run_fit_neurons)


def _parse_part(text: str | None) -> tuple[int, int] | None:
    """'K/N' (1-based, as people count) -> (K-1, N)."""
    if text is None:
        return None
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        from .errors import ConfigError

        raise ConfigError(f"--part: expected K/N with 1 <= K <= N, found {text!r}")
    return int(k) - 1, int(n)


def _run_fit_neurons(args) -> int:
    from .models import load_model
    from .stages.fit_neurons import fit_neurons, fitted_subject

    part = _parse_part(args.part)
    kind, path, requests, fmt = _load_data(args)
    model, tokenizer = load_model(args.model)
    config, variants = _fit_config(args, args.layer), None
    if args.pseudo:
        from .config import MeGConfig
        from .editor import MeGEditor

        _, pool = _load_pool(args, kind, path)
        editor = MeGEditor(model, tokenizer, MeGConfig(layer=args.layer, fit=config, seed=config.init_seed))
        variants, record = editor.variants(requests, pool)
        print(f"wordings per edit: {record['mean_wordings']:.2f} ({record['edits_with_paraphrases']} edits with pool paraphrases)")
    result = fit_neurons(model, tokenizer, requests, fmt, config, progress=args.progress,
                         work_dir=args.work_dir, part=part, variants=variants)
    result.save(args.out)
    s = result.summary()
    print(f"fitted {s['n']} edits at layer {result.spec.layer}: success {s['success_rate']:.1f}%, median steps "
          f"{s['median_steps']}, {result.timing['total_s']:.0f} s ({s['n'] / result.timing['total_s']:.2f} edits/s)"
          f" -> {args.out}")
    if args.eval:
        from .eval import evaluate

        mine = set(result.case_ids)  # with --part, this process's edits only
        requests = [r for r in requests if r.case_id in mine]
        report = evaluate(fitted_subject(model, tokenizer, result), requests, prompt_format=fmt, data_kind=kind,
                          data_name=f"{kind}:{path.name}", progress=args.progress)
        report.save(args.out.with_suffix(".eval.json"))
        print(report.table())
    return 0


def _add_sweep_layers(sub) -> None:
    p = sub.add_parser(
        "sweep-layers", help="fit a sample of edits at each layer and compare",
        description="Fit the same edits at each candidate layer; report success rate, steps, time and the "
        "fitted vectors' Reliability / Generality / Locality.",
    )
    _add_data_args(p, "edits to fit per layer (default 64)")
    p.add_argument("--layers", type=layer_list, default="2,4,6,8,10,12,14,16,18,20,22,24,26",
                   help="comma-separated 0-based layers")
    _add_fit_args(p)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(run=_run_sweep_layers, limit=64)


def _run_sweep_layers(args) -> int:
    from .eval.report import markdown_table
    from .io import atomic_write_json
    from .models import load_model
    from .stages.fit_neurons import sweep_layers

    kind, path, requests, fmt = _load_data(args)
    model, tokenizer = load_model(args.model)
    rows = sweep_layers(model, tokenizer, requests, fmt, args.layers, _fit_config(args, args.layers[0]), args.progress)
    table = [[str(r["layer"]), f"{r['success_rate']:.1f}", f"{r['median_steps']}", f"{r['fit_s']:.0f}"]
             + [f"{r['metrics'][k][s]:.1f}" for k in ("reliability", "generality", "locality") for s in ("ag", "tf")]
             for r in rows]
    print(markdown_table(["layer", "success %", "median steps", "fit s", "RelAG", "RelTF", "GenAG", "GenTF",
                          "LocAG", "LocTF"], table))
    if args.json:
        atomic_write_json(args.json, {"data": f"{kind}:{path.name}", "n": len(requests), "format": fmt.to_dict(),
                                      "config": vars(args) | {"run": None, "json": str(args.json)}, "rows": rows})
    return 0


def _add_fit_router(sub) -> None:
    p = sub.add_parser(
        "fit-router", help="stages B and C: tune the encoder, train and calibrate the router",
        description="Tune the sentence encoder on a pseudo-edit pool (InfoNCE), train the familiarity router "
        "on the edit prompts, choose epsilon on the pool, and report paraphrase retrieval and routing on the "
        "edits' own queries. Writes encoder.safetensors, router.safetensors, routing.json and router-distance.png.",
    )
    _add_data_args(p, "edit the first N records", lm=False)
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="pseudo-edit pool (default: the records of --data after the edited ones)")
    p.add_argument("--encoder", default="minilm", help="'minilm' (embedded), a local folder or a hub id")
    p.add_argument("--temperature", type=float, default=None, help="InfoNCE temperature")
    p.add_argument("--encoder-epochs", type=int, default=None)
    p.add_argument("--router", choices=["nearest", "entropy"], default=None,
                   help="router kind: cosine distance to the nearest edit prompt (default) or the paper's entropy net")
    p.add_argument("--router-epochs", type=int, default=None, help="entropy router: at most this many epochs")
    p.add_argument("--epsilon", type=float, default=None, help="set the router threshold by hand (no calibration)")
    p.add_argument("--max-false-fire", type=float, default=None,
                   help="calibrate for the most recall with at most this false-fire percent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=_run_fit_router)


def _run_fit_router(args) -> int:
    from .io import atomic_write_json
    from .models import load_encoder
    from .plots import router_histogram
    from .stages.encoder import save_encoder_delta
    from .stages.routing import RoutingConfig, fit_routing, routing_report

    kind, path, requests, _ = _load_data(args)
    pool_name, pool = _load_pool(args, kind, path)
    config = RoutingConfig(seed=args.seed)
    config.encoder.seed = config.router.seed = args.seed
    for target, name, value in ((config.encoder, "temperature", args.temperature),
                                (config.encoder, "epochs", args.encoder_epochs),
                                (config.router, "kind", args.router),
                                (config.router, "max_epochs", args.router_epochs),
                                (config.router, "epsilon", args.epsilon),
                                (config.router, "max_false_fire", args.max_false_fire)):
        if value is not None:
            setattr(target, name, value)
    base = load_encoder(args.encoder)
    routing = fit_routing(requests, pool, base, config, progress=args.progress)
    report = routing_report(routing, base, requests)
    save_encoder_delta(routing.encoder, routing.encoder_training, args.encoder, args.out / "encoder.safetensors")
    routing.router.save(args.out / "router.safetensors")
    distances = report.pop("distances")
    atomic_write_json(args.out / "routing.json", {"data": f"{kind}:{path.name}", "limit": args.limit, "pool": pool_name, **report,
                                                  **routing.record})
    xlabel = (f"router entropy (nats; max ln {config.router.classes})" if config.router.kind == "entropy"
              else "1 - cosine to the nearest edit prompt")
    router_histogram(distances, routing.router.epsilon, config.router.max_distance, xlabel,
                     args.out / "router-distance.png", title=f"{kind}:{path.name}, N={len(requests)}, {config.router.kind} router")
    r, s = report["retrieval_top1"], report["routing"]
    print(f"paraphrase retrieval top-1 among {r['n']} edit prompts: frozen {r['frozen']:.1f}%, tuned {r['tuned']:.1f}%")
    print(f"epsilon {routing.router.epsilon:.3f}: routed familiar: prompts {s['prompt']['familiar']:.1f}%, "
          f"rephrases {s['rephrase']['familiar']:.1f}%, locality {s['locality']['familiar']:.1f}% "
          f"({routing.record['timing']['total_s']:.0f} s) -> {args.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error (`megedit VERB --help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="megedit",
        description="Massive knowledge editing of language models with MeG (generated dynamic neurons).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_eval(sub)
    _add_fit_neurons(sub)
    _add_sweep_layers(sub)
    _add_fit_router(sub)
    from .cli_meg import add_meg_verbs

    add_meg_verbs(sub, _add_data_args, _load_data, _load_pool)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.progress = not args.quiet and sys.stderr.isatty()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.WARNING if args.quiet else logging.INFO)
    _quiet_transformers()
    from .errors import MeGError

    try:
        return args.run(args)
    except MeGError as error:
        if args.debug:
            raise
        print(f"megedit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megedit: interrupted", file=sys.stderr)
        return 130


def _quiet_transformers() -> None:
    """The library's own loading bars and notices drown the CLI's output."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
