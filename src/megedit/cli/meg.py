"""The verbs that make and use MeG edit packs: demo, fit, generate, inspect, and config (the
effective settings as YAML)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .common import add_data_args, add_model_args, add_pool_arg, add_processes_arg, add_verb, load_data, load_lm, load_pack, load_pool
from .options import add_meg_flags, meg_config
from .types import non_empty, positive_int

log = logging.getLogger("megedit")

# 12 edits: the generator's validation distance is lowest by about 1,000 steps
DEMO_DEFAULTS = {"generator": {"train_steps": 1000}}  # given alone, it clears the passes


# -- demo ---------------------------------------------------------------------------------------


def add_demo(sub) -> None:
    p = add_verb(
        sub, "demo", "the main job: edit SmolLM2 (or --model) with 12 built-in counterfactual edits and show before/after",
        "Fit MeG on the built-in demo edits (12 counterfactual facts written for megedit) with the "
        "embedded SmolLM2 and MiniLM, then print each edit's prompt, paraphrase, another question about its "
        "subject, an unrelated question and the prompt as a chat turn, before and after editing, and the scores. Stages are cached in --work-dir: a rerun is quick. "
        "Without --config a trained generator (--generator mlp or dit) runs 1,000 steps (enough for 12 edits).",
    )
    add_model_args(p)
    p.add_argument("--work-dir", type=Path, default=None, help="stage cache (default: <megedit cache>/demo)")
    p.add_argument("--out", type=Path, default=None, help="also save the edit pack here")
    add_meg_flags(p)
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from ..data.demo import DEMO_EDITS, demo_requests, fallback_pool
    from ..data.specificity import with_specificity
    from ..edited import check_pack_target
    from ..editor import MeGEditor
    from ..eval import evaluate
    from ..models import cache_root

    if args.out:
        check_pack_target(args.out)  # before the fit, not after it
    config = meg_config(args, DEMO_DEFAULTS)
    edits, pool = demo_requests()
    pool += fallback_pool()  # its records name their subjects: the edits' negatives and specificity come from it
    edits = with_specificity(edits, pool, per_edit=2)
    model, tokenizer = load_lm(args)
    start = time.perf_counter()
    edited = MeGEditor(model, tokenizer, config, progress=args.progress).fit(
        edits, args.work_dir or cache_root() / "demo", pool, pool_name="megedit demo and fallback pools")
    fit_s = time.perf_counter() - start
    print(_before_after(edited, edits))
    report = evaluate(edited, edits, prompt_format=config.prompt_format, data_name=f"jsonl:{DEMO_EDITS.name}",
                      progress=args.progress, chat_edits=None)
    print()
    print(report.table())
    t = edited.record["timing"]
    print(f"N={report.n} edits (megedit demo set), model={report.model}, format={config.prompt_format}, "
          f"seed={config.seed}; fit {fit_s:.0f} s (A {t['A']['seconds']:.0f} s, B+C {t['BC']['seconds']:.0f} s, "
          f"D {t['D']['seconds']:.0f} s), eval {report.timing['total_s']:.0f} s")
    if args.out:
        edited.save_pretrained(args.out)
        print(f"saved the edit pack to {args.out}")
    return 0


def _before_after(edited, requests) -> str:
    """One row per query: its kind, text, the base model's answer, the edited model's, the goal.
    Per edit: its prompt, a paraphrase, the same subject asked something else, an unrelated
    question, and its prompt as a chat turn."""
    from ..eval.report import markdown_table

    texts = []
    for r in requests:
        texts += [("edit", r.prompt, r.target), ("paraphrase", r.rephrases[0], r.target) if r.rephrases else None,
                  ("same subject, other question", r.specificity[0], "(unchanged)") if r.specificity else None,
                  ("unrelated", r.locality[0].prompt, "(unchanged)") if r.locality else None]
    texts = [t for t in texts if t]
    chats = [r.prompt for r in requests]
    with edited.unedited():
        before = edited.generate([t[1] for t in texts], max_new_tokens=8) + _chat_replies(edited, chats)
    after = edited.generate([t[1] for t in texts], max_new_tokens=8) + _chat_replies(edited, chats)
    texts += [("chat", r.prompt, r.target) for r in requests]
    _, distance, familiar = edited.route([t[1] for t in texts])
    rows = [[kind, text, b, a, goal, f"{'edit' if f else 'off'} ({max(d, 0.0):.2f})"]
            for (kind, text, goal), b, a, d, f in zip(texts, before, after, distance.tolist(), familiar.tolist())]
    return markdown_table(["query", "text", "before", "after", "goal", "router (distance)"], rows)


def _chat_replies(edited, messages: list[str]) -> list[str]:
    """One-turn chat replies (32 tokens at most), their line breaks shown as ' / ' to fit a table row."""
    if not getattr(edited.tokenizer, "chat_template", None):
        return ["(no chat template)"] * len(messages)
    return [" / ".join(line.strip() for line in reply.splitlines() if line.strip())
            for reply in edited.chat(list(messages), max_new_tokens=32)]


# -- fit ----------------------------------------------------------------------------------------


def add_fit(sub) -> None:
    p = add_verb(
        sub, "fit", "edit a model with MeG and save the edit pack",
        "Run stages A-D (fit neurons, tune the encoder, train and calibrate the router, train the "
        "generator) on the edits and write the edit pack (only the added parts) to --out. Stages are cached "
        "under --work-dir by a hash of their inputs; a killed run resumes.",
    )
    add_data_args(p, "edit the first N records")
    add_pool_arg(p)
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="the edit pack folder (only an earlier pack is replaced)")
    p.add_argument("--work-dir", type=Path, default=None, help="stage cache (default: OUT.work)")
    add_processes_arg(p)
    add_meg_flags(p)
    p.set_defaults(run=run_fit)


def run_fit(args) -> int:
    from ..edited import check_pack_target
    from ..editor import MeGEditor
    from ..parallel import leave_group, ranks

    check_pack_target(args.out)  # before the fit, not after it
    kind, path, requests, fmt = load_data(args)
    pool_name, pool = load_pool(args, kind, path)
    config = meg_config(args, prompt_format=fmt.name)  # bad settings stop the run before the model loads
    model, tokenizer = load_lm(args)
    editor = MeGEditor(model, tokenizer, config, progress=args.progress, processes=args.processes)
    work_dir = args.work_dir or args.out.with_name(args.out.name + ".work")
    if ranks()[1] > 1:  # under a launcher the ranks share stage A; then rank 0 goes on alone, finding it done
        editor.fit_part(requests, work_dir, pool, pool_name)
        if leave_group() != 0:
            return 0
    edited = editor.fit(requests, work_dir, pool, pool_name)
    edited.save_pretrained(args.out)
    r = edited.record
    print(f"MeG: {r['n_edits']} edits, fit success {r['fit']['success_rate']:.1f}%, epsilon {edited.router.epsilon:.3f}; "
          + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in r["timing"].items() if isinstance(v, dict))
          + f" -> {args.out}")
    return 0


# -- using a pack -------------------------------------------------------------------------------


def add_generate(sub) -> None:
    p = add_verb(sub, "generate", "answer prompts with an edited model (and the base model beside it)",
                 "Greedy answers of the edited model for each prompt, next to the base model's, "
                 "with the router's decision.")
    p.add_argument("pack", type=Path, help="edit pack folder")
    p.add_argument("prompts", nargs="+", type=non_empty, help="raw prompts (the pack's prompt format wraps them)")
    add_model_args(p, None, pack=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=20, help="at most this many new tokens per answer")
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template")
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from ..data.prompts import PRESETS

    edited = load_pack(args)
    fmt = PRESETS["chat"] if args.chat else None
    after = edited.generate(args.prompts, args.max_new_tokens, prompt_format=fmt)
    with edited.unedited():
        before = edited.generate(args.prompts, args.max_new_tokens, prompt_format=fmt)
    for prompt, b, a, why in zip(args.prompts, before, after, _router_lines(edited, args.prompts)):
        print(f"{prompt}\n  edited: {a}\n  base:   {b}\n  router: {why}")
    return 0


def _router_lines(edited, prompts: list[str]) -> list[str]:
    """Per prompt, the router's decision and why: its distance against epsilon, and for a near
    query that does not fire, whether the question gate or a negative held it back."""
    _, distance, familiar, rows = edited.route_to_edits(prompts)
    near = (distance < edited.router.epsilon).tolist()
    gate: list[tuple[float | None, float]] = [(None, 0.0)] * len(prompts)  # (question cosine, its threshold)
    if edited.gate is not None and any(near):
        asked = [i for i, n in enumerate(near) if n and rows[i] is not None]
        for i, s in zip(asked, edited.gate.similarity([prompts[i] for i in asked], [rows[i] for i in asked])):
            gate[i] = (s, edited.gate.threshold_of(rows[i]))
    lines = []
    for d, f, n, (s, threshold) in zip(distance.tolist(), familiar.tolist(), near, gate):
        why = f"distance {max(d, 0.0):.3f}, epsilon {edited.router.epsilon:.3f}"
        if not f and n:
            held = (f"another question about its subject (question cosine {s:.2f} < {threshold:.2f})"
                    if s is not None and s < threshold else "held back by a negative")
            why = f"{why}; {held}"
        elif f and s is not None:  # the gate let it through: say by how much
            why = f"{why}; question cosine {s:.2f} >= {threshold:.2f}"
        lines.append(f"{'edit' if f else 'off'} ({why})")
    return lines


def add_inspect(sub) -> None:
    p = add_verb(sub, "inspect", "what an edit pack holds; router distances on edit data as a PNG",
                 "Print an edit pack's base model, neuron, router, generator, settings and stage "
                 "times. With --data, route the data's prompts, rephrases and locality prompts and write a "
                 "histogram of router distance with epsilon marked (--png); only then is the model loaded.")
    p.add_argument("pack", type=Path, help="edit pack folder")
    p.add_argument("--data", default=None, metavar="KIND:PATH", help="edit data whose queries are routed")
    p.add_argument("--limit", type=positive_int, default=None, help="route the first N records")
    p.add_argument("--png", type=Path, default=None, help="histogram file (default: PACK/router-distance.png)")
    add_model_args(p, None, pack=True)
    p.set_defaults(run=run_inspect)


def _generator_size(generator) -> str:
    return generator.kind.describe(generator.net, generator.config)


def run_inspect(args) -> int:
    import json

    from ..edited import read_manifest
    from ..stages.generator import Generator
    from ..stages.router import Router

    m = read_manifest(args.pack)
    edited = load_pack(args) if args.data else None  # routing the data needs the whole pack
    router, generator = ((edited.router, edited.generator) if edited else
                         (Router.load(args.pack / "router.safetensors"), Generator.load(args.pack / "generator.safetensors")))
    r = m.get("record", {})
    print(f"edit pack {args.pack}: {r.get('n_edits', '?')} edits on {m['base_model']['source']} "
          f"(fingerprint {m['base_model']['fingerprint'][:12]})")
    print(f"neuron: layer {m['spec']['layer']}, {m['spec']['variant']}, {m['spec']['hidden']} wide; "
          f"prompt format {m['prompt_format']['name']}")
    print(f"router: {router.config.kind}, epsilon {router.epsilon:.3f}; generator: {_generator_size(generator)}")
    if "timing" in r:
        print("stage times: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in r["timing"].items() if isinstance(v, dict)))
    for h in m.get("history", []):  # `megedit add` / `remove` since the fit
        print(f"{h['time']}: {h['op']} {len(h['ids'])} edits ({h['n_before']} -> {h['n_after']})")
    print("versions: " + json.dumps(m.get("versions", {})))
    if edited:
        _route_histogram(args, edited)
    return 0


def _route_histogram(args, edited) -> None:
    from ..data import load_requests, parse_data_arg
    from ..plots import router_histogram
    from ..stages.router import route_stats

    kind, path = parse_data_arg(args.data)
    requests = load_requests(kind, path, limit=args.limit, skip_invalid=True)
    groups = {"prompt": [r.prompt for r in requests], "rephrase": [r.rephrases[0] for r in requests if r.rephrases],
              "locality": [r.locality[0].prompt for r in requests if r.locality]}
    embedded = {k: edited.encoder.encode(v) for k, v in groups.items()}
    stats = route_stats(edited.router, embedded)
    for name, s in stats.items():
        print(f"{name}: {s['n']} queries, {s['familiar']:.1f}% routed to the edit")
    png = args.png or args.pack / "router-distance.png"
    router_histogram({k: edited.router.distance(v).cpu().tolist() for k, v in embedded.items()}, edited.router.epsilon,
                     edited.router.config.max_distance, "router distance", png, title=f"{kind}:{path.name}")
    print(f"wrote {png}")


# -- config -------------------------------------------------------------------------------------


def add_config(sub) -> None:
    p = add_verb(sub, "config", "print the effective MeG settings as YAML (defaults, --config, flags)",
                 "Print every MeG setting as `fit` would use it: the defaults, overridden by --config, overridden "
                 "by the flags given, with the run's layer and seed copied into each stage. The output is a valid "
                 "--config file.")
    add_meg_flags(p, formats=True)
    p.set_defaults(run=run_config)


def run_config(args) -> int:
    import yaml

    config = meg_config(args).resolved()
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False), end="")
    return 0
