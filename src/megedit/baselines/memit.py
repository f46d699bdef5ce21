"""MEMIT and AlphaEdit: batch edits of the MLP output projections of a span of layers.

Both share every step but the last:
1. keys: the input of the output projection at each edit's subject-last token;
2. target values: for each edit, a vector delta added to the residual stream after the last
   layer of the span (at the subject-last token) is optimised so the model says the target;
   the wanted hidden state there is z = h + delta;
3. layer by layer (lowest first), the remaining gap (z - h) is divided among the layers still
   to edit and written into this layer's output projection as a least-squares update:
   MEMIT   dW = R K^T (lam C + K K^T)^-1      (C: covariance of the keys of ordinary text)
   AlphaEdit dW = R K^T P (K K^T P + a I)^-1  (P: projector on C's null space, so dW C = 0:
                                               the keys of ordinary text map exactly as before)

As the authors do, the keys and the value search use the prompt behind context prefixes the
model writes itself (`context_prefixes`: half of 5 tokens, half of 10), and the value search keeps
the next-token distribution after "{subject} is a" near the base model's (`kl_factor`). One
deviation: the key covariance comes from text the base model samples itself
(`generic_text.sampled_text`, >= 100,000 tokens) instead of 100,000 Wikipedia samples, as
nothing may be fetched at run time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import mlp_out_path, num_layers
from ..data.prompts import PromptFormat
from ..data.requests import EditRequest
from ..errors import ConfigError
from ..io import atomic_save_tensors, load_tensors
from ..lm import Batch, layer_input, left_pad, length_batches, model_device, starting_at_layer
from ..methods import EditJob
from ..models import cache_root, model_fingerprint
from ..runtime.subject import WeightEditSubject
from ..stages.variants import context_prefixes
from .config import MemitConfig
from .ft import TrainingBatch

log = logging.getLogger(__name__)

def default_layers(model: nn.Module) -> tuple[int, ...]:
    """MEMIT's Llama span (layers 4-8 of 32) scaled to this depth."""
    n = num_layers(model)
    first = max(0, round(0.13 * n))
    return tuple(range(first, min(n, round(0.27 * n)) + 1))


# -- the least-squares updates (pure math; tested on their own) ----------------------------------


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, weight: float) -> torch.Tensor:
    """dW (d_out, d_k) minimising |dW K - R|^2 + weight * tr(dW C dW^T); keys (n, d_k), resid (n, d_out)."""
    keys, resid = keys.double(), resid.double()
    a = weight * cov.double() + keys.T @ keys
    return torch.linalg.solve(a, keys.T @ resid).T


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector on the span of C's eigenvectors with eigenvalue below `threshold` (d_k, d_k)."""
    values, vectors = torch.linalg.eigh(cov.double())
    null = vectors[:, values < threshold]
    return null @ null.T


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, l2: float) -> torch.Tensor:
    """dW (d_out, d_k) = R K^T P (K K^T P + l2 I)^-1; its rows lie in range(P), so dW k0 = 0 for
    every key k0 in C's null complement (the preserved keys)."""
    keys, resid, p = keys.double(), resid.double(), projector.double()
    a = p @ (keys.T @ keys) + l2 * torch.eye(p.shape[0], dtype=p.dtype)
    return torch.linalg.solve(a, p @ keys.T @ resid).T


# -- reading keys and hidden states ---------------------------------------------------------------


def subject_positions(tokenizer, fmt: PromptFormat, requests: Sequence[EditRequest]) -> list[int]:
    """Index, in each formatted prompt's tokens, of the subject's last token (the prompt's last
    token when the subject is unknown or not found)."""
    positions = []
    for r in requests:
        text = fmt.text(r.prompt, tokenizer)
        enc = tokenizer(text, add_special_tokens=not fmt.chat, return_offsets_mapping=True)
        last = len(enc["input_ids"]) - 1
        at = text.rfind(r.subject) if r.subject else -1
        if at >= 0:
            end = at + len(r.subject)
            inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > s]
            last = inside[-1] if inside else last
        positions.append(last)
    return positions


def _out_weight(module: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) view of an output projection's weight (Conv1D stores it transposed)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


@contextmanager
def _capture_keys(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, list]]:
    """Inside the block, every forward pass appends each layer's output-projection input to out[layer]."""
    out: dict[int, list] = {layer: [] for layer in layers}
    handles = [model.get_submodule(mlp_out_path(model, layer)).register_forward_pre_hook(
        lambda module, args, layer=layer: out[layer].append(args[0].detach())) for layer in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _prompt_batches(model, tokenizer, fmt, requests, positions, batch_size):
    """(row indices, left-padded batch, absolute subject positions) per length-sorted batch."""
    prompts = [fmt.prompt_ids(r.prompt, tokenizer) for r in requests]
    for idx in length_batches([len(p) for p in prompts], batch_size):
        batch = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id, model_device(model))
        width = batch.ids.shape[1]
        yield idx, batch, torch.tensor([width - len(prompts[i]) + positions[i] for i in idx])


@torch.no_grad()
def keys_and_hidden(model, tokenizer, fmt, requests, positions, layer: int, last: int,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at `layer` (n, d_k) and the hidden state after layer `last` (n, d), at each subject."""
    keys, hidden = [None] * len(requests), [None] * len(requests)
    for idx, batch, pos in _prompt_batches(model, tokenizer, fmt, requests, positions, batch_size):
        with _capture_keys(model, [layer]) as k:
            h = layer_input(model, last + 1, batch)  # the layers above `last` are not run
        for j, i in enumerate(idx):
            keys[i], hidden[i] = k[layer][0][j, pos[j]], h[j, pos[j]]
    return torch.stack(keys).double().cpu(), torch.stack(hidden).double().cpu()


# -- context prefixes ----------------------------------------------------------------------------


def context_templates(model, tokenizer, count: int, seed: int) -> list[str]:
    """`count` sentences the model writes from plain starts, half of 5 tokens and half of 10 (the
    authors' context templates), to put before each prompt."""
    short = count // 2
    return (context_prefixes(model, tokenizer, short, tokens=5, seed=seed)
            + context_prefixes(model, tokenizer, count - short, tokens=10, seed=seed))


def _prefixed(requests: Sequence[EditRequest], prefixes: Sequence[str]) -> list[EditRequest]:
    """Each request's prompt alone, then behind every prefix (edit-major)."""
    return [r if not p else replace(r, prompt=f"{p} {r.prompt}") for r in requests for p in ("", *prefixes)]


@torch.no_grad()
def context_keys(model, tokenizer, fmt, requests, prefixes: Sequence[str], layer: int, last: int,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at `layer` averaged over each edit's prompt and its prefixed copies (n, d_k), and the
    hidden state after `last` at the subject of the prompt alone (n, d)."""
    rows = _prefixed(requests, prefixes)
    keys, hidden = keys_and_hidden(model, tokenizer, fmt, rows, subject_positions(tokenizer, fmt, rows), layer, last,
                                   batch_size)
    per = 1 + len(prefixes)
    return keys.view(len(requests), per, -1).mean(dim=1), hidden[::per]


# -- target values -------------------------------------------------------------------------------


def _row_nll(tb, logits: torch.Tensor) -> torch.Tensor:
    """Each row's mean cross-entropy over its answer tokens (B,)."""
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tb.labels.flatten(), reduction="none")
    valid = (tb.labels != -100).float()
    return (ce.view_as(valid) * valid).sum(dim=1) / valid.sum(dim=1)


def _at_subject(model, batch: Batch, positions: Sequence[int], last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states after layer `last` (B, T, d), and each row's absolute subject position."""
    pos = (batch.mask == 0).sum(dim=1) + torch.as_tensor(positions, device=batch.ids.device)  # after left padding
    with torch.no_grad():
        return layer_input(model, last + 1, batch), pos


def _run_shifted(model, batch: Batch, base, pos, shift, last: int, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions with `shift` added at each row's subject after `last`."""
    rows = torch.arange(len(pos), device=pos.device)
    shifted = base.index_put((rows, pos), base[rows, pos] + shift)
    with starting_at_layer(model, last + 1, shifted):
        return model(**batch.model_inputs, use_cache=False, logits_to_keep=keep).logits


class _Essence:
    """The KL term: "{subject} is a" per edit (where the subject is known); its next-token
    log-probabilities with the edit's delta against the base model's."""

    def __init__(self, model, tokenizer, fmt, group: Sequence[EditRequest], last: int) -> None:
        self.model, self.last = model, last
        self.edits = [e for e, r in enumerate(group) if r.subject]
        asks = [replace(group[e], prompt=f"{group[e].subject} is a") for e in self.edits]
        self.batch = left_pad([fmt.prompt_ids(r.prompt, tokenizer) for r in asks], tokenizer.pad_token_id,
                              model_device(model)) if asks else None
        if self.batch is not None:
            self.base, self.pos = _at_subject(model, self.batch, subject_positions(tokenizer, fmt, asks), last)
            with torch.no_grad():
                logits = model(**self.batch.model_inputs, use_cache=False, logits_to_keep=1).logits
            self.ref = logits[:, -1].float().log_softmax(-1)

    def kl(self, delta: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """KL(edited || base) per active edit (0 where it has no subject)."""
        out = torch.zeros(delta.shape[0], device=delta.device)
        keep = [j for j, e in enumerate(self.edits) if bool((active == e).any())]
        if self.batch is None or not keep:
            return out[active]
        keep_t = torch.tensor(keep, device=delta.device)
        edits = torch.tensor([self.edits[j] for j in keep], device=delta.device)
        b = self.batch
        sub = Batch(b.ids[keep_t], b.mask[keep_t], b.positions[keep_t])
        logp = _run_shifted(self.model, sub, self.base[keep_t], self.pos[keep_t], delta[edits], self.last, 1)[:, -1]
        logp = logp.float().log_softmax(-1)
        return out.index_add(0, edits, (logp.exp() * (logp - self.ref[keep_t])).sum(-1))[active]


def _values_dir(model, fmt, last: int, config: MemitConfig, prefixes: Sequence[str], progress: bool = False):
    """Where target values are cached: the same for MEMIT and AlphaEdit (their value search is
    identical) and for any set of edits, since each edit's search is its own (a per-edit delta,
    a summed loss, element-wise Adam): a larger run reuses a smaller one's edits."""
    key = {"model": model_fingerprint(model, progress), "format": asdict(fmt), "last": last, "prefixes": list(prefixes),
           **{k: getattr(config, k) for k in ("v_steps", "v_lr", "v_weight_decay", "clamp_norm", "v_tol", "kl_factor",
                                              "batch_size")}}
    return cache_root() / "memit-values" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _edit_digest(request: EditRequest) -> bytes:
    return hashlib.sha256(json.dumps([request.prompt, request.subject, request.target]).encode()).digest()


def _cached_values(folder) -> dict[bytes, tuple[torch.Tensor, float, int, float]]:
    """digest -> (z, loss, search steps of its batch, its share of the batch's search seconds)."""
    found = {}
    for shard in sorted(folder.glob("values-*.safetensors")):
        t = load_tensors(shard, "target values")
        share = float(t["seconds"]) / len(t["edits"])
        for j, digest in enumerate(t["edits"]):
            found[bytes(digest.tolist())] = (t["z"][j], float(t["nll"][j]), int(t["steps"]), share)
    return found


def _value_groups(model, tokenizer, fmt, requests, prefixes, batch_size: int):
    """Edits grouped by length, as many per group as fit `batch_size` rows (at least one): per group
    (the requests' indices, the rows' training batch, the rows' subject positions)."""
    per = 1 + len(prefixes)
    lengths = [len(fmt.prompt_ids(r.prompt, tokenizer)) + len(fmt.answer_ids(r.target, tokenizer)) for r in requests]
    for idx in length_batches(lengths, max(1, batch_size // per)):
        rows = _prefixed([requests[i] for i in idx], prefixes)
        tb = TrainingBatch.build([fmt.prompt_ids(r.prompt, tokenizer) for r in rows],
                                 [fmt.answer_ids(r.target, tokenizer, with_stop=True) for r in rows],
                                 tokenizer.pad_token_id, model_device(model))
        yield idx, tb, subject_positions(tokenizer, fmt, rows)


def _search_batch(model, tb, positions, per: int, essence: _Essence | None, last: int,
                  config: MemitConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """z for one group of edits: Adam on a per-edit delta at the subject's hidden state after layer
    `last`, shared by the edit's `per` rows (its prompt first, then the prefixed copies). An edit
    whose loss is below `v_tol` is frozen and its rows leave the forward pass; returns (z, loss, steps)."""
    base, pos = _at_subject(model, tb.batch, positions, last)
    device = base.device
    owner = torch.arange(tb.labels.shape[0], device=device) // per
    n = int(owner[-1]) + 1
    h = base[torch.arange(n, device=device) * per, pos[::per]].detach()  # the prompt alone: the clamp's scale
    delta = torch.zeros_like(h, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=config.v_lr)
    max_norm = config.clamp_norm * h.norm(dim=-1, keepdim=True)
    loss_of = torch.full((n,), float("inf"), device=device)
    active, steps = torch.arange(n, device=device), 0
    for steps in range(1, config.v_steps + 1):
        live = torch.isin(owner, active).nonzero().squeeze(1)
        sub = tb.select(live)
        logits = _run_shifted(model, sub.batch, base[live], pos[live], delta[owner[live]], last, sub.span)
        nll = torch.zeros(n, device=device).index_add(0, owner[live], _row_nll(sub, logits))[active] / per
        loss = nll + (config.kl_factor * essence.kl(delta, active) if essence else 0)
        loss_of[active] = loss.detach()
        done = loss.detach() < config.v_tol
        if bool(done.all()):
            break
        decay = config.v_weight_decay * (delta[active].norm(dim=-1) ** 2 / h[active].norm(dim=-1) ** 2)
        frozen = delta.detach().clone()
        optimiser.zero_grad()
        (loss + decay)[~done].sum().backward()  # a sum: each edit's gradient does not depend on the others
        optimiser.step()
        with torch.no_grad():
            keep = torch.ones(n, dtype=torch.bool, device=device)
            keep[active[~done]] = False
            delta[keep] = frozen[keep]  # Adam's momentum would still move finished edits
            delta.mul_((max_norm / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))
        active = active[~done]
    return (h + delta).detach(), loss_of, steps


def target_values(model, tokenizer, fmt, requests, last: int, config: MemitConfig, prefixes: Sequence[str] = (),
                  progress: bool = True) -> tuple[torch.Tensor, dict]:
    """z (n, d): the hidden state after layer `last`, at each subject, that makes the model say the
    target (after the prompt and after each prefixed copy). The layers up to `last` run once per
    group; only the layers above run per step, and only for the edits not yet done. Each group is
    cached on disk as it finishes, so a killed search resumes and edits searched before (in any
    run with these settings and prefixes) are not searched again."""
    if last + 1 >= num_layers(model):
        raise ConfigError(f"the edited span must end below the last layer ({num_layers(model) - 1}), got {last}")
    folder = _values_dir(model, fmt, last, config, prefixes, progress)
    found = _cached_values(folder)
    digests = [_edit_digest(r) for r in requests]
    reused = {d for d in digests if d in found}
    first = {}
    for i, d in enumerate(digests):
        if d not in found:
            first.setdefault(d, i)  # an edit listed twice is searched once
    missing = list(first.values())
    groups = list(_value_groups(model, tokenizer, fmt, [requests[i] for i in missing], prefixes, config.batch_size))
    for idx, tb, positions in tqdm(groups, desc=f"{config.method} target values", disable=not progress, leave=False):
        rows = [missing[j] for j in idx]
        start = time.perf_counter()
        essence = _Essence(model, tokenizer, fmt, [requests[i] for i in rows], last) if config.kl_factor else None
        bz, bloss, n_steps = _search_batch(model, tb, positions, 1 + len(prefixes), essence, last, config)
        edits = torch.tensor([list(digests[i]) for i in rows], dtype=torch.uint8)
        t = {"z": bz.cpu(), "nll": bloss.cpu(), "steps": torch.tensor(n_steps), "edits": edits,
             "seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}
        atomic_save_tensors(folder / f"values-{hashlib.sha256(edits.numpy().tobytes()).hexdigest()[:16]}.safetensors", t)
        for j, i in enumerate(rows):
            found[digests[i]] = (t["z"][j], float(t["nll"][j]), n_steps, float(t["seconds"]) / len(rows))
    z, loss, steps, seconds = zip(*(found[d] for d in digests))
    record = {"final_loss_mean": sum(loss) / len(loss), "v_converged": sum(x < config.v_tol for x in loss) / len(loss),
              "v_steps_mean": sum(steps) / len(steps), "values_cache": str(folder),
              # what the search of these edits took when it ran, also when it came from the cache now
              "values_search_s": sum(seconds), "values_reused_edits": sum(d in reused for d in digests),
              "values_reused_s": sum(s for d, s in zip(digests, seconds) if d in reused)}
    return torch.stack(z).double(), record


def pool_texts(pool: Sequence[EditRequest]) -> list[str]:
    """Plain text from pseudo-edit records (never the edits): prompts, rephrases, locality prompts,
    in a seeded shuffle so that a prefix of the list mixes all three."""
    texts = list(dict.fromkeys([t for r in pool for t in (r.prompt, *r.rephrases, *(q.prompt for q in r.locality))]))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    return [texts[i] for i in order]


# -- key covariance of ordinary text ----------------------------------------------------------------


def key_covariances(model, tokenizer, layers: Sequence[int], texts: Sequence[str], batch_size: int = 32,
                    progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """E[k k^T] of the output-projection inputs at each layer over every token of `texts`, and
    the token count; cached on disk by (model, layers, texts)."""
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(model, progress), "layers": list(layers),
                                     "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()}).encode())
    path = cache_root() / "key-covariance" / f"{key.hexdigest()[:24]}.safetensors"
    if path.exists():
        t = load_tensors(path, "key covariance")
        return {layer: t[f"cov.{layer}"].double() for layer in layers}, int(t["count"])
    ids = [tokenizer(t)["input_ids"] for t in texts]
    sums, count = {}, 0
    last = max(layers)
    for idx in tqdm(length_batches([len(x) for x in ids], batch_size), desc="key covariance", disable=not progress,
                    leave=False):
        batch = left_pad([ids[i] for i in idx], tokenizer.pad_token_id, model_device(model))
        mask = batch.mask.bool()
        with torch.no_grad(), _capture_keys(model, layers) as captured:
            if last + 1 < num_layers(model):
                layer_input(model, last + 1, batch)  # stops above the span
            else:
                model(**batch.model_inputs, use_cache=False, logits_to_keep=1)
        for layer in layers:
            k = captured[layer][0][mask].float()
            sums[layer] = sums.get(layer, 0) + (k.T @ k).double().cpu()  # float32 products, float64 sums
        count += int(mask.sum())
    covs = {layer: sums[layer] / count for layer in layers}
    atomic_save_tensors(path, {**{f"cov.{layer}": c.float() for layer, c in covs.items()},
                               "count": torch.tensor(count)})
    return covs, count


# -- the edit ----------------------------------------------------------------------------------------


def search_values(model, tokenizer, requests: Sequence[EditRequest], fmt: PromptFormat,
                  config: MemitConfig | None = None, progress: bool = True):
    """The first half of `batch_edit`: (the config with its span resolved, the context prefixes,
    z (n, d), the search's record). Run alone on disjoint slices of the edits, in several
    processes, it fills the shared value cache so that a later `batch_edit` only solves."""
    config = (config or MemitConfig()).validate()
    config = replace(config, layers=tuple(sorted(config.layers or default_layers(model))))
    prefixes = context_templates(model, tokenizer, config.context_prefixes, config.seed)
    z, record = target_values(model, tokenizer, fmt, requests, config.layers[-1], config, prefixes, progress)
    return config, prefixes, z, record


def _memit_layer(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, config: MemitConfig) -> tuple:
    return memit_update(keys, resid, cov, config.mom2_weight), {}


def _alphaedit_layer(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, config: MemitConfig) -> tuple:
    projector = null_space_projector(cov, config.null_threshold)
    return alphaedit_update(keys, resid, projector, config.l2), {"null_space_dim": round(float(projector.trace()))}


# MemitConfig.method -> one layer's update and its record (the two methods differ only here)
_LAYER_UPDATES = {"memit": _memit_layer, "alphaedit": _alphaedit_layer}


def batch_edit(model, tokenizer, requests: Sequence[EditRequest], fmt: PromptFormat, cov_texts: Sequence[str],
               config: MemitConfig | None = None, progress: bool = True) -> WeightEditSubject:
    """Edit the output projections of `config.layers` for all requests at once (MEMIT or
    AlphaEdit); returns the edited model as a subject whose `unedited()` restores it exactly."""
    start = time.perf_counter()
    config, prefixes, z, v_record = search_values(model, tokenizer, requests, fmt, config, progress)
    layers, last = config.layers, config.layers[-1]
    covs, n_tokens = key_covariances(model, tokenizer, layers, cov_texts, progress=progress)
    originals, record = {}, {"per_layer": {}}
    for layer in tqdm(layers, desc=f"{config.method} layers", disable=not progress, leave=False):
        name = mlp_out_path(model, layer)
        weight = _out_weight(model.get_submodule(name))
        keys, h = context_keys(model, tokenizer, fmt, requests, prefixes, layer, last, config.batch_size)
        resid = (z - h) / (last - layer + 1)  # this layer's share of the remaining gap
        update, record["per_layer"][layer] = _LAYER_UPDATES[config.method](keys, resid, covs[layer], config)
        originals[f"{name}.weight"] = model.get_submodule(name).weight.detach().clone()
        with torch.no_grad():
            weight += update.to(weight.device, weight.dtype)
        record["per_layer"][layer] |= {"update_norm": float(update.norm()), "gap_norm_mean": float((z - h).norm(dim=1).mean())}
        log.info("%s layer %d: update norm %.3f", config.method, layer, record["per_layer"][layer]["update_norm"])
    settings = {**asdict(config), "method": config.method, "cov_tokens": n_tokens, "cov_texts": len(cov_texts),
                "context_prefix_texts": prefixes,
                "subject_positions": "subject's last token (prompt's last where unknown)", **v_record, **record,
                "edit_time_s": time.perf_counter() - start}
    return WeightEditSubject(model, tokenizer, config.method, originals, settings)


def edit_with_memit(job: EditJob) -> WeightEditSubject:
    """The method registry's entry for "memit" and "alphaedit" (megedit/methods.py)."""
    texts = job.covariance_texts()
    log.info("%s: %d edits, key covariance from %d texts", job.config.method, len(job.requests), len(texts))
    return batch_edit(job.model, job.tokenizer, job.requests, job.fmt, texts, job.config, progress=job.progress)
