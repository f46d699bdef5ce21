"""Causal tracing (Meng et al. 2022, ROME) of the SmolLM2-135M base model on known CounterFact
facts: which layers' MLPs carry a fact at the subject's last token, to choose MEMIT's edit span.

    .venv/bin/python bench/causal_trace.py                        # 100 known facts, 5 noise draws
    .venv/bin/python bench/causal_trace.py --facts 50 --samples 3 --window 10

Facts are the first N records of counterfact-train.json (never the edit set) whose true answer's
first token is the model's greedy next token. Per fact, the subject's token embeddings get
Gaussian noise (3 x the std of those embeddings over all chosen facts); then each layer l in turn
gets the clean MLP output restored at the subject's last token for a window of layers around l,
or the clean layer output (residual stream) at layer l alone. Indirect effect = p(true answer
token | restored) - p(... | corrupted), averaged over facts. The suggested span is the 5
consecutive layers with the largest summed MLP effect that end at or before its peak.
Results: bench/results/causal_trace-smollm2.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from result_schema import write_result

HERE = Path(__file__).resolve().parent
POOL = HERE.parents[1] / "shared/data/counterfact/counterfact-train.json"
RESULT = HERE / "results/causal_trace-smollm2.json"
SPAN = 5  # MEMIT's number of edited layers


def subject_first(tokenizer, fmt, request) -> int | None:
    """Index of the subject's first token in the formatted prompt (None when not found)."""
    text = fmt.text(request.prompt, tokenizer)
    enc = tokenizer(text, add_special_tokens=not fmt.chat, return_offsets_mapping=True)
    at = text.rfind(request.subject) if request.subject else -1
    if at < 0:
        return None
    end = at + len(request.subject)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > at]
    return inside[0] if inside else None


@torch.no_grad()
def known_facts(model, tokenizer, fmt, pool, n: int, batch: int = 64) -> list[dict]:
    """The first `n` pool records whose true answer's first token is the greedy next token."""
    from megedit.baselines.memit import subject_positions

    facts = []
    for at in range(0, len(pool), batch):
        chunk = [r for r in pool[at:at + batch] if r.subject and r.ground_truth]
        ids = [fmt.prompt_ids(r.prompt, tokenizer) for r in chunk]
        for r, ids_r, guess in zip(chunk, ids, greedy_next(model, ids)):
            first = subject_first(tokenizer, fmt, r)
            answer = fmt.answer_ids(r.ground_truth, tokenizer)[0]
            if first is not None and guess == answer:
                last = subject_positions(tokenizer, fmt, [r])[0]
                facts.append({"request": r, "ids": ids_r, "answer": answer, "first": first, "last": last})
            if len(facts) == n:
                return facts
    return facts


def greedy_next(model, prompts: list[list[int]]) -> list[int]:
    """Greedy next token per prompt. Right padding needs no mask: causal attention never lets a
    real token see the padding after it."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    hidden = model.model(ids).last_hidden_state[torch.arange(len(prompts)), [len(p) - 1 for p in prompts]]
    return model.lm_head(hidden).argmax(-1).tolist()


def noise_scale(model, facts) -> float:
    """3 x the std of embedding entries over every chosen fact's subject tokens (ROME's choice)."""
    ids = [t for f in facts for t in f["ids"][f["first"]: f["last"] + 1]]
    return 3.0 * model.model.embed_tokens.weight[ids].std().item()


@contextmanager
def hooks(model, state: dict):
    """Noise on the subject's embeddings and clean restores at the subject's last token.

    `state` says what the current pass covers: `offset` (absolute position of its first token,
    since the suffix pass runs on a cached prefix), `noise` (rows, subject tokens, d) or None,
    and per-layer row masks `mlp` / `hidden` with the clean vectors `clean_mlp` / `clean_hidden`.
    """

    def add_noise(module, args, out):
        if state.get("noise") is None:
            return out
        start = max(state["first"], state["offset"])
        stop = min(state["last"] + 1, state["offset"] + out.shape[1])
        out = out.clone()
        for p in range(start, stop):
            out[:, p - state["offset"]] += state["noise"][:, p - state["first"]]
        return out

    def restore(kind, layer):
        def hook(module, args, out):
            mask, at = state.get(kind, {}).get(layer), state["last"] - state["offset"]
            if mask is None or not 0 <= at < (out[0] if isinstance(out, tuple) else out).shape[1]:
                return out
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[mask, at] = state["clean_" + kind][layer]
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(add_noise)]
    for layer, block in enumerate(model.model.layers):
        handles.append(block.mlp.register_forward_hook(restore("mlp", layer)))
        handles.append(block.register_forward_hook(restore("hidden", layer)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def answer_prob(model, hidden, answer: int) -> torch.Tensor:
    """p(answer token) at the last position, per row (the LM head only on that position)."""
    return model.lm_head(hidden[:, -1]).float().softmax(-1)[:, answer]


@torch.no_grad()
def clean_run(model, fact, state) -> float:
    """p_clean, and the clean MLP and layer outputs at the subject's last token into `state`."""
    keep = {"mlp": {}, "hidden": {}}

    def grab(kind, layer):
        return lambda m, a, out: keep[kind].__setitem__(
            layer, (out[0] if isinstance(out, tuple) else out)[0, fact["last"]].clone())

    handles = []
    for layer, block in enumerate(model.model.layers):
        handles += [block.mlp.register_forward_hook(grab("mlp", layer)),
                    block.register_forward_hook(grab("hidden", layer))]
    try:
        hidden = model.model(torch.tensor([fact["ids"]])).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    state["clean_mlp"], state["clean_hidden"] = keep["mlp"], keep["hidden"]
    return answer_prob(model, hidden, fact["answer"]).item()


def row_masks(n_layers: int, window: int, samples: int) -> tuple[dict, dict]:
    """Per layer, the rows it restores. Rows per noise draw: corrupted, MLP window centred on
    l = 0..L-1, layer output at l = 0..L-1; draws are stacked (draw-major)."""
    rows = 1 + 2 * n_layers
    mlp, hidden = {}, {}
    for m in range(n_layers):
        per = torch.zeros(rows, dtype=torch.bool)
        for l in range(n_layers):
            per[1 + l] = max(0, l - window // 2) <= m < min(n_layers, l - (-window // 2))
        mlp[m] = per.repeat(samples)
        per = torch.zeros(rows, dtype=torch.bool)
        per[1 + n_layers + m] = True
        hidden[m] = per.repeat(samples)
    return mlp, hidden


@torch.no_grad()
def trace_fact(model, fact, noise: torch.Tensor, masks: tuple[dict, dict]) -> dict:
    """Clean, corrupted and every restored probability of one fact, averaged over noise draws.

    Tokens before the subject's last token are the same in every row of a draw (nothing is
    restored there yet), so they run once per draw and the restored rows reuse their KV cache.
    """
    from megedit.lm import cache_kwargs, output_cache

    samples, rows = noise.shape[0], 1 + 2 * len(model.model.layers)
    state = {"first": fact["first"], "last": fact["last"]}
    p_clean = clean_run(model, fact, state)
    ids, s = torch.tensor([fact["ids"]]), fact["last"]
    cache = None
    with hooks(model, state):
        if s > 0:
            state.update(offset=0, noise=noise)
            cache = output_cache(model.model(ids[:, :s].expand(samples, -1), use_cache=True))
            cache.batch_repeat_interleave(rows)
        state.update(offset=s, noise=noise.repeat_interleave(rows, 0), mlp=masks[0], hidden=masks[1])
        out = model.model(ids[:, s:].expand(samples * rows, -1), use_cache=cache is not None,
                          **cache_kwargs(model.model, cache))
    p = answer_prob(model, out.last_hidden_state, fact["answer"]).view(samples, rows).mean(0)
    n = len(model.model.layers)
    return {"clean": p_clean, "corrupted": p[0].item(), "mlp": p[1:1 + n] - p[0], "hidden": p[1 + n:] - p[0]}


def suggest_span(effect: list[float], peak: int) -> list[int]:
    """The SPAN consecutive layers with the largest summed effect among spans ending at or
    before the peak (or the first SPAN layers, when the peak comes earlier than that)."""
    starts = range(0, max(0, peak - SPAN + 1) + 1)
    best = max(starts, key=lambda a: sum(effect[a:a + SPAN]))
    return list(range(best, best + SPAN))


def report(rows: list[dict], args, scale: float, n_layers: int, wall: float, n_known: int) -> dict:
    mlp = torch.stack([r["mlp"] for r in rows]).mean(0).tolist()
    hidden = torch.stack([r["hidden"] for r in rows]).mean(0).tolist()
    peak = max(range(n_layers), key=lambda layer: mlp[layer])
    half = args.window // 2
    protocol = (f"Known facts: the first {n_known} records of {POOL.name} (in file order) whose true answer's first "
                f"token (' ' + ground_truth) is the model's greedy next token after the raw prompt. Corruption: "
                f"Gaussian noise N(0, {scale:.4f}^2) (3 x std of embedding entries over all chosen facts' subject "
                f"tokens) added to the subject tokens' embeddings, {args.samples} draws per fact (seed {args.seed}), "
                f"the same draws for every restoration. MLP effect at layer l: clean MLP outputs restored at the "
                f"subject's last token for layers max(0,l-{half})..min(L,l+{args.window - half})-1 "
                f"(window {args.window}). Hidden effect at layer l: clean layer output (residual stream) restored at "
                f"the subject's last token at layer l only. Indirect effect = p(true first token | restored) - "
                f"p(... | corrupted), mean over draws, then over facts.")
    return {"protocol": protocol, "model": "smollm2", "data": str(POOL), "n_facts": len(rows),
            "noise_std": scale, "samples": args.samples, "window": args.window, "seed": args.seed,
            "p_clean_mean": sum(r["clean"] for r in rows) / len(rows),
            "p_corrupted_mean": sum(r["corrupted"] for r in rows) / len(rows),
            "mlp_indirect_effect": mlp, "hidden_indirect_effect": hidden, "mlp_peak_layer": peak,
            "suggested_span": suggest_span(mlp, peak), "case_ids": [r["case_id"] for r in rows],
            "wall_s": wall, "torch_threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=5, help="noise draws per fact")
    parser.add_argument("--window", type=int, default=10, help="MLP layers restored around each layer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from megedit import load_model, load_requests, model_fingerprint
    from megedit.data.prompts import get_format

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2", device="cpu")
    model.eval()
    facts = known_facts(model, tokenizer, get_format("raw"), load_requests("counterfact", POOL), args.facts)
    scale, n_layers = noise_scale(model, facts), len(model.model.layers)
    masks, gen = row_masks(n_layers, args.window, args.samples), torch.Generator().manual_seed(args.seed)
    rows = []
    for i, fact in enumerate(facts):
        n_subject, d = fact["last"] - fact["first"] + 1, model.config.hidden_size
        noise = scale * torch.randn(args.samples, n_subject, d, generator=gen)
        rows.append({**trace_fact(model, fact, noise, masks), "case_id": fact["request"].case_id})
        print(f"\r{i + 1}/{len(facts)} facts, {time.perf_counter() - start:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    result = report(rows, args, scale, n_layers, time.perf_counter() - start, len(facts))
    print(f"p_clean {result['p_clean_mean']:.3f}  p_corrupted {result['p_corrupted_mean']:.3f}  "
          f"noise std {scale:.4f}  facts {len(facts)}")
    print("layer  MLP IE (window)  hidden IE")
    for layer, (mlp, hidden) in enumerate(zip(result["mlp_indirect_effect"], result["hidden_indirect_effect"])):
        print(f"{layer:5d}  {mlp:15.4f}  {hidden:9.4f}")
    print(f"MLP peak: layer {result['mlp_peak_layer']}; suggested span: {result['suggested_span']}; "
          f"{result['wall_s']:.0f} s on {result['torch_threads']} thread(s)")
    write_result(RESULT, result, model="smollm2", fingerprint=model_fingerprint(model), n=len(facts), seed=args.seed,
                 method="causal trace", config=vars(args), data={"facts": POOL})
    return 0


if __name__ == "__main__":
    sys.exit(main())
