"""`megedit eval`: an edit pack, the unedited model or a baseline, through the one harness."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..methods import WEIGHT_EDITORS
from .common import add_data_args, add_model_args, add_processes_arg, add_verb, load_data, load_lm, load_pack, load_pool
from .types import layer_list, non_negative_int, positive_int

log = logging.getLogger("megedit")

# none: the unedited model; the others from the method registry
METHODS = ("none", *WEIGHT_EDITORS)


def add_eval(sub) -> None:
    p = add_verb(
        sub, "eval", "score a pack or a method on edit data (Rel/Gen/Loc x AG/TF + Score)",
        "Edit N facts with a method (or none), or load an edit pack, and score the result with the shared "
        "harness. Writes the eval JSON (metrics, protocol, timing, one row per query) with --json.",
    )
    p.add_argument("pack", type=Path, nargs="?", default=None,
                   help="an edit pack folder (MeG; the base model is the one the pack names unless --model)")
    p.add_argument("--method", choices=METHODS, default="none",
                   help="none: the unedited model; ft: fine-tuning; memit / alphaedit: batch weight editing")
    add_data_args(p, "edit the first N records")
    add_model_args(p, None, pack=True)
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose MLP the method edits (ft; default: where MeG's neuron goes, 24 on SmolLM2)")
    p.add_argument("--layers", type=layer_list, default=None,
                   help="memit / alphaedit: comma-separated layers (default 4..8 on SmolLM2)")
    p.add_argument("--cov-tokens", type=positive_int, default=None,
                   help="memit / alphaedit: the key covariance from this many tokens of text the base model writes "
                   "itself (default 120,000; written once per model and cached: ~21 min for SmolLM2 on one CPU thread)")
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="memit / alphaedit: the key covariance from these records' prompts, rephrases and locality "
                   "prompts instead of model-written text")
    p.add_argument("--cov-texts", type=int, default=4000, help="with --pseudo: at most this many covariance texts")
    p.add_argument("--save-edit", type=Path, default=None, help="ft / memit / alphaedit: save the weight deltas here")
    p.add_argument("--load-edit", type=Path, default=None, help="evaluate saved weight deltas instead of editing")
    p.add_argument("--seed", type=int, default=0, help="seed of the baseline edit (ft, memit, alphaedit)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="queries decoded together (default: the harness's, 128)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="at most this many new tokens per answer (AG; default 20, or the longest target's tokens)")
    add_processes_arg(p, "decode the evaluation's batches")
    p.add_argument("--decode-unchanged", action="store_true",
                   help="decode the locality and specificity queries a pack's router turns away too, and the "
                        "unedited model on them (by default they get full credit, which is what decoding both gives, "
                        "and their texts are null in the report's cases; this checks it and fills them in, slower)")
    p.add_argument("--specificity", type=non_negative_int, default=3, metavar="K",
                   help="per edit, K prompts about its subject that ask something else, scored against the unedited "
                        "model's answers (0: none; records' own 'specificity' prompts are kept)")
    p.add_argument("--specificity-pool", metavar="KIND:PATH", default=None,
                   help="the relation wordings for --specificity (default: the records of --data after the edited "
                        "ones, else megedit's fallback pool)")
    p.add_argument("--chat-edits", type=non_negative_int, default=256, metavar="K",
                   help="ask the first K edits' prompt and first rephrase as chats too (0: none)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the eval JSON here (a killed run resumes from JSON.partial beside it, and a "
                        "killed FT from JSON.ft-training.pt)")
    p.defer(_add_baseline_flags)
    p.set_defaults(run=run_eval)


def _add_baseline_flags(p) -> None:
    """The baselines' settings, one flag per field of each registered method's settings class
    (--ft-..., --memit-... for memit and alphaedit, which share theirs); --layer, --layers and
    --seed set the rest, and the name sets MemitConfig.method."""
    from ..methods import METHODS as REGISTRY
    from .options import Section, add_dataclass_flags

    sections = {m.flags: m for m in map(REGISTRY.get, WEIGHT_EDITORS)}
    for prefix, method in sections.items():
        users = " / ".join(name for name in WEIGHT_EDITORS if REGISTRY[name].flags == prefix)
        add_dataclass_flags(p, method.config(), Section((prefix,), prefix, f"{users} settings (--method {users})"),
                            skip=("layer", "layers", "seed", *dict(method.fixed)), aliases=dict(method.aliases))


def _subject(args, requests, fmt, kind, path):
    """What is scored, and the prompt format it answers in."""
    from ..eval import PlainSubject

    if args.pack is not None:
        if args.method != "none" or args.load_edit:
            from ..errors import ConfigError

            raise ConfigError("eval: give an edit pack, or --method / --load-edit, not both")
        subject = load_pack(args)
        return subject, subject.prompt_format
    model, tokenizer = load_lm(args, args.model or "smollm2")
    if args.load_edit is not None:
        from ..runtime.subject import WeightEditSubject

        return WeightEditSubject.load(args.load_edit, model, tokenizer), fmt
    if args.method == "none":
        return PlainSubject(model, tokenizer), fmt
    subject = _weight_edit(args, model, tokenizer, requests, fmt, kind, path)
    if args.save_edit:
        subject.save(args.save_edit)
    return subject, fmt


def _baseline_config(args):
    """The settings of --method from the --ft-* / --memit-* flags given, checked before anything
    loads; None for the unedited model and packs. Flags of a method that is not run are a usage error."""
    from ..errors import ConfigError
    from ..methods import get_method
    from .options import overrides

    given = overrides(args)
    method = get_method(args.method) if args.pack is None and args.method != "none" else None
    stray = sorted(set(given) - ({method.flags} if method else set()))
    if stray:
        flags = ", ".join(f"--{section}-{name.replace('_', '-')}" for section in stray for name in given[section])
        raise ConfigError(f"eval: {flags} set a method that is not run (--method {args.method})")
    if method is None:
        return None
    if method.needs_covariance and args.pseudo and args.cov_tokens:
        raise ConfigError("--pseudo and --cov-tokens name two sources for the key covariance: give one")
    return method.settings(given.get(method.flags, {}), layer=args.layer, seed=args.seed,
                           layers=tuple(args.layers) if args.layers else None)


def run_eval(args) -> int:
    from ..errors import ConfigError
    from ..eval import evaluate
    from ..parallel import launched, ranks

    args.baseline = _baseline_config(args)
    if args.baseline is not None and launched() > 1:
        raise ConfigError(f"eval --method {args.method} under a launcher would make the edit in every rank: make it "
                          "once with --save-edit, then evaluate it under the launcher with --load-edit")
    kind, path, requests, fmt = load_data(args)
    subject, fmt = _subject(args, requests, fmt, kind, path)
    requests = _with_specificity(args, kind, path, requests)
    start = time.perf_counter()
    report = evaluate(subject, requests, prompt_format=fmt, data_kind=kind, data_name=f"{kind}:{path.name}",
                      max_new_tokens=args.max_new_tokens, progress=args.progress,
                      **({"batch_size": args.batch_size} if args.batch_size else {}),
                      checkpoint=args.json and args.json.with_name(args.json.name + ".partial"),
                      processes=args.processes, decode_unchanged=args.decode_unchanged, chat_edits=args.chat_edits)
    log.info("evaluated %d edits in %.0f s", len(requests), time.perf_counter() - start)
    if ranks()[0] != 0:  # under a launcher: rank 0 holds the same report and writes it
        return 0
    print(report.table())
    print(f"N={report.n}  data={report.data}  model={report.model}  format={fmt.name}  seed={args.seed}")
    if args.json:
        report.save(args.json)
        _ft_training(args).unlink(missing_ok=True)
        print(f"wrote {args.json}")
    return 0


def _with_specificity(args, kind: str, path: Path, requests):
    """The requests with --specificity probes from the pool's relation wordings (data/specificity.py)."""
    from ..data.demo import fallback_pool
    from ..data.specificity import with_specificity

    if not args.specificity:
        return requests
    name, pool = load_pool(args, kind, path, option="specificity_pool")
    if not pool:
        name, pool = "megedit fallback pool", fallback_pool()
    log.info("specificity: %d prompts per edit from the relation wordings of %s", args.specificity, name)
    return with_specificity(requests, pool, args.specificity)


def _weight_edit(args, model, tokenizer, requests, fmt, kind, path):
    """Edit the model's weights with the --method from the registry (ft, memit, alphaedit)."""
    from ..methods import EditJob, get_method

    job = EditJob(model, tokenizer, requests, fmt, args.baseline, progress=args.progress,
                  checkpoint=_ft_training(args), covariance_texts=lambda: _covariance_texts(args, model, tokenizer,
                                                                                           kind, path))
    return get_method(args.method).edit(job)


def _covariance_texts(args, model, tokenizer, kind: str, path: Path) -> list[str]:
    """The key covariance's texts: the --pseudo pool's prompts, else text the base model writes."""
    from ..baselines.generic_text import DEFAULT_TOKENS, sampled_text
    from ..baselines.memit import pool_texts

    if args.pseudo:
        pool_name, pool = load_pool(args, kind, path)
        log.info("key covariance from the texts of %s", pool_name)
        return pool_texts(pool)[: args.cov_texts]
    log.info("key covariance from text the base model wrote")
    return sampled_text(model, tokenizer, args.cov_tokens or DEFAULT_TOKENS, progress=args.progress)


def _ft_training(args) -> Path | None:
    """With --json: the file FT's training state goes to after each epoch, so a killed run resumes."""
    return args.json and args.json.with_name(args.json.name + ".ft-training.pt")
