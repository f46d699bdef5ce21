"""The `megedit` command: one verb per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("megedit")

METHODS = ("none", "ft")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a method on edit data (Rel/Gen/Loc x AG/TF + Score)",
        description="Edit N facts with a method (or none) and score the result with the shared harness. "
        "Writes the eval JSON (metrics, protocol, timing, one row per query) with --json.",
    )
    p.add_argument("--method", choices=METHODS, default="none", help="none: the unedited model; ft: fine-tuning")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local folder or a hub id")
    p.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="edit data, e.g. counterfact:../shared/data/counterfact/counterfact-edit.json")
    p.add_argument("--limit", type=int, default=None, help="edit the first N records")
    p.add_argument("--offset", type=int, default=0, help="skip this many records first")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out malformed records (with a warning) instead of stopping")
    p.add_argument("--format", dest="prompt_format", choices=("raw", "qa", "chat"), default=None,
                   help="prompt wrapping (default: raw for CounterFact, qa for ZsRE)")
    p.add_argument("--layer", type=int, default=8, help="layer whose MLP the method edits (ft)")
    p.add_argument("--lr", type=float, default=None, help="ft learning rate")
    p.add_argument("--epochs", type=int, default=None, help="ft epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="write the eval JSON here")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from .data import load_requests, parse_data_arg
    from .data.prompts import DEFAULT_FOR_KIND, get_format
    from .eval import PlainSubject, evaluate
    from .models import load_model

    kind, path = parse_data_arg(args.data)
    requests = load_requests(kind, path, limit=args.limit, offset=args.offset, skip_invalid=args.skip_invalid)
    fmt = get_format(args.prompt_format or DEFAULT_FOR_KIND[kind])
    model, tokenizer = load_model(args.model)
    subject = PlainSubject(model, tokenizer)
    if args.method == "ft":
        from .baselines.ft import FTConfig, fine_tune

        overrides = {k: v for k, v in (("lr", args.lr), ("epochs", args.epochs)) if v is not None}
        config = FTConfig(layer=args.layer, seed=args.seed, **overrides)
        log.info("fine-tuning layer %d on %d edits", config.layer, len(requests))
        subject = fine_tune(model, tokenizer, requests, fmt, config, progress=args.progress)
    start = time.perf_counter()
    report = evaluate(subject, requests, prompt_format=fmt, data_kind=kind, data_name=f"{kind}:{path.name}",
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=args.progress)
    log.info("evaluated %d edits in %.0f s", len(requests), time.perf_counter() - start)
    print(report.table())
    print(f"N={report.n}  data={report.data}  model={report.model}  format={fmt.name}  seed={args.seed}")
    if args.json:
        report.save(args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megedit",
        description="Massive knowledge editing of language models with MeG (generated dynamic neurons).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_eval(sub)
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
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
