"""Stage B: tune the sentence encoder so that a paraphrase lands next to its original query.

InfoNCE with in-batch negatives on (query, paraphrase) pairs from a pseudo-edit pool that is
disjoint from the edits (their real paraphrases are unknown at edit time). Only the top
`trainable_layers` layers train, so the layers below are run once over every sentence and their
output is cached (`lm.layer_input`); each step then runs just the trainable layers.

The tuned encoder is saved as a delta: the trained layers' weights plus the base encoder's name,
never the whole encoder. Given a checkpoint folder, training saves its state (trained weights,
Adam's moments, shuffle order and generator, position) after each epoch, so a killed run resumes
to the weights an uninterrupted one gives; the sentence cache is rebuilt, not saved (it is large).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import layer_stack_path
from ..data.requests import EditRequest
from ..data.specificity import negative_prompts
from ..errors import ConfigError, MeGError
from ..io import atomic_save_tensors, atomic_write_bytes, atomic_write_json, load_tensors, read_record
from ..lm import layer_input, starting_at_layer
from ..models import SentenceEncoder, load_encoder, model_fingerprint
from ..settings import check_settings, setting

log = logging.getLogger(__name__)


@dataclass
class EncoderConfig:
    trainable_layers: int = setting(1, at_least=1, help="top transformer layers tuned (the authors tune the last)")
    temperature: float = setting(0.05, above=0, help=(
        "InfoNCE's: cosine / temperature; the authors' 1.0 learns far slower here"))
    batch_size: int = setting(256, at_least=2, help="pairs per step")
    lr: float = setting(1e-4, above=0, help="AdamW's learning rate")
    weight_decay: float = setting(0.01, at_least=0, help="AdamW's weight decay")
    epochs: int = setting(4, at_least=0, help="passes over the pseudo-edit pairs")
    seed: int = setting(0, help="the pairs' order and the hard negatives' draw")
    hard_negatives: int = setting(2, at_least=0, help=(
        "per pair, prompts about the same subject that ask something else, as extra candidates the paraphrase must "
        "not pick: the encoder learns the relation, not just the subject"))

    def validate(self) -> "EncoderConfig":
        return check_settings(self, "encoder config")


def training_triples(pool: Sequence[EditRequest], config: EncoderConfig,
                     ) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
    """(queries, paraphrases, hard negatives) for `train_encoder`: each pool record's prompt with
    each of its rephrases, and `config.hard_negatives` other-relation prompts about its subject plus
    one plain one (from the pool's negative-half wordings; () with none asked)."""
    per_record = negative_prompts(pool, pool, config.hard_negatives, min(1, config.hard_negatives), config.seed)
    triples = dict.fromkeys((r.prompt, p, negatives) for r, negatives in zip(pool, per_record)
                            for p in r.rephrases if p != r.prompt)
    return [q for q, _, _ in triples], [p for _, p, _ in triples], [n for _, _, n in triples]


@torch.inference_mode()
def retrieval_top1(encoder: SentenceEncoder, originals: Sequence[str], paraphrases: Sequence[str]) -> float:
    """Percent of paraphrases whose nearest original (cosine, among all `originals`) is their own;
    `paraphrases[i]` belongs to `originals[i]`."""
    if len(originals) != len(paraphrases) or not originals:
        raise ConfigError("retrieval_top1 needs one paraphrase per original and at least one pair")
    keys, queries = encoder.encode(list(originals)), encoder.encode(list(paraphrases))
    hits = (queries @ keys.T).argmax(dim=1).cpu() == torch.arange(len(originals))
    return 100.0 * hits.float().mean().item()


class _CachedInputs:
    """Every distinct sentence tokenised once, with the hidden state entering the first trainable
    layer (trimmed to the sentence's own tokens)."""

    def __init__(self, encoder: SentenceEncoder, texts: list[str], first_trained: int, batch_size: int = 128,
                 progress: bool = False) -> None:
        self.index = {t: i for i, t in enumerate(texts)}
        self.ids: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
        slots: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(texts)  # type: ignore[list-item]
        starts = range(0, len(order), batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="encoding sentences", disable=not progress or len(starts) < 2, leave=False):
                rows = order[start : start + batch_size]
                inputs = encoder.tokenize([texts[i] for i in rows])
                hidden = layer_input(encoder.model, first_trained, inputs)
                for j, i in enumerate(rows):
                    n = int(inputs["attention_mask"][j].sum())
                    slots[i] = (inputs["input_ids"][j, :n].clone(), hidden[j, :n].clone())
        self.ids = [s[0] for s in slots]
        self.hidden = [s[1] for s in slots]

    def length(self, text: str) -> int:
        return len(self.ids[self.index[text]])

    def batch(self, texts: Sequence[str], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Right-padded inputs and cached hidden states for `texts` (padding is masked everywhere)."""
        rows = [self.index[t] for t in texts]
        width = max(len(self.ids[i]) for i in rows)
        ref = self.hidden[rows[0]]
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=ref.device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=ref.device)
        hidden = torch.zeros((len(rows), width, ref.shape[-1]), dtype=ref.dtype, device=ref.device)
        for j, i in enumerate(rows):
            n = len(self.ids[i])
            ids[j, :n], mask[j, :n], hidden[j, :n] = self.ids[i], 1, self.hidden[i]
        return {"input_ids": ids, "attention_mask": mask}, hidden


def info_nce(paraphrase_emb: torch.Tensor, query_emb: torch.Tensor, temperature: float,
             negative_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Each paraphrase must pick its own query among all queries in the batch and the batch's hard
    negatives (normalised inputs)."""
    candidates = query_emb if negative_emb is None else torch.cat([query_emb, negative_emb])
    logits = paraphrase_emb @ candidates.T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def trainable_parameters(encoder: SentenceEncoder, trainable_layers: int) -> dict[str, nn.Parameter]:
    """The parameters of the top `trainable_layers` transformer layers, by their names in the encoder."""
    stack = layer_stack_path(encoder.model)
    layers = encoder.model.get_submodule(stack)
    if trainable_layers > len(layers):
        raise ConfigError(f"encoder has {len(layers)} layers; cannot train the top {trainable_layers}")
    first = len(layers) - trainable_layers
    return {f"{stack}.{i}.{name}": p for i in range(first, len(layers)) for name, p in layers[i].named_parameters()}


@dataclass
class EncoderTraining:
    """What `train_encoder` did: the config, the loss per epoch and the time taken."""

    config: EncoderConfig
    n_pairs: int
    losses: list[float]
    timing: dict[str, float]


CHECKPOINT = "encoder-checkpoint.safetensors"


@dataclass
class _Position:
    """Where training stands; with the weights and Adam's moments, all that a checkpoint restores."""

    order: list[int]  # the pairs' order, shuffled in place at each epoch's start
    rng: random.Random  # the shuffle's generator
    epoch: int = 0  # epochs finished
    step: int = 0  # batches finished in the current epoch
    total: float = 0.0  # the current epoch's summed loss so far
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training time spent before the last checkpoint


class _Checkpoint:
    """Stage B's training state in one safetensors file, the position as JSON in its header: one
    atomic write, so a kill leaves the previous checkpoint whole. `digest` names the inputs; a
    checkpoint of other inputs is ignored (and overwritten by the next save)."""

    def __init__(self, folder: str | Path, digest: str, every_s: float) -> None:
        self.path, self.digest, self.every_s = Path(folder) / CHECKPOINT, digest, every_s
        self.saved_at = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.saved_at >= self.every_s

    def save(self, at: _Position, params: dict[str, nn.Parameter], optimiser, seconds: float) -> None:
        from safetensors.torch import save

        names = list(params)  # the optimiser numbers its parameters in this order
        tensors = {f"param.{n}": p for n, p in params.items()} | {"order": torch.tensor(at.order)}
        for i, state in optimiser.state_dict()["state"].items():
            tensors |= {f"adam.{names[i]}.{k}": v for k, v in state.items()}
        meta = {"digest": self.digest, "epoch": at.epoch, "step": at.step, "total": at.total, "losses": at.losses,
                "seconds": seconds, "rng": at.rng.getstate()}
        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"megedit": json.dumps(meta)})
        atomic_write_bytes(self.path, blob)
        self.saved_at = time.perf_counter()

    def restore(self, at: _Position, params: dict[str, nn.Parameter], optimiser) -> bool:
        """Load the checkpoint into `at`, `params` and `optimiser`; False (nothing changed) if there
        is none for these inputs or it cannot be read."""
        from safetensors import safe_open

        if not self.path.exists():
            return False
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta, tensors = json.loads(f.metadata()["megedit"]), {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:  # a damaged file only costs the work it held
            log.warning("stage B: ignoring unreadable checkpoint %s (%s)", self.path, error)
            return False
        if meta["digest"] != self.digest or {f"param.{n}" for n in params} - set(tensors):
            log.info("stage B: ignoring %s, a checkpoint of other inputs", self.path)
            return False
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param.{name}"].to(p.device, p.dtype))
        index = {name: i for i, name in enumerate(params)}
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                name, field_name = key[len("adam."):].rsplit(".", 1)
                state.setdefault(index[name], {})[field_name] = value
        optimiser.load_state_dict({**optimiser.state_dict(), "state": state})
        version, internal, gauss = meta["rng"]
        at.rng.setstate((version, tuple(internal), gauss))
        at.order, at.epoch, at.step, at.total = tensors["order"].tolist(), meta["epoch"], meta["step"], meta["total"]
        at.losses, at.seconds = list(meta["losses"]), meta["seconds"]
        return True


def _inputs_digest(encoder: SentenceEncoder, pairs: list[tuple], config: EncoderConfig, progress: bool) -> str:
    """What a checkpoint's training depends on: the base encoder's weights, the pairs, the settings."""
    queries, paraphrases, negatives = zip(*pairs)
    blob = {"encoder": model_fingerprint(encoder.model, progress), "max_length": encoder.max_length,
            "config": asdict(config), "queries": list(queries), "paraphrases": list(paraphrases),
            **({"negatives": [list(n) for n in negatives]} if any(negatives) else {})}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _embed(tuned: SentenceEncoder, cache: _CachedInputs, first: int, texts: list[str],
           group: int = 128) -> torch.Tensor:
    """Embeddings of cached `texts`, in their order, run in groups of similar length: one batch padded to its
    longest sentence spends most of its compute on padding."""
    order = sorted(range(len(texts)), key=lambda i: cache.length(texts[i]))
    parts = []
    for start in range(0, len(order), group):
        inputs, hidden = cache.batch([texts[i] for i in order[start : start + group]], tuned.tokenizer.pad_token_id)
        with starting_at_layer(tuned.model, first, hidden):
            parts.append(tuned(**inputs))
    emb = torch.cat(parts)
    return emb[torch.argsort(torch.tensor(order, device=emb.device))]


def _step(tuned: SentenceEncoder, cache: _CachedInputs, first: int, chunk: list[tuple[str, str, tuple]], optimiser,
          temperature: float) -> float:
    """One InfoNCE step on a batch of (query, paraphrase, hard negatives) triples; returns the batch's loss."""
    negatives = list(dict.fromkeys(n for _, _, ns in chunk for n in ns))
    emb = _embed(tuned, cache, first, [q for q, _, _ in chunk] + [p for _, p, _ in chunk] + negatives)
    n = len(chunk)
    loss = info_nce(emb[n : 2 * n], emb[:n], temperature, emb[2 * n :] if negatives else None)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return loss.item()


def _run_epochs(tuned, cache, first, pairs, params, optimiser, config: EncoderConfig, at: _Position,
                checkpoint: _Checkpoint | None, progress: bool) -> None:
    """Train from `at` to the last epoch; checkpoint after every epoch and every `every_s` seconds."""
    n_batches, size, start = -(-len(pairs) // config.batch_size), config.batch_size, time.perf_counter()
    bar = tqdm(total=config.epochs * n_batches, initial=at.epoch * n_batches + at.step, desc="training encoder",
               disable=not progress)
    for epoch in range(at.epoch, config.epochs):
        if at.step == 0:
            at.rng.shuffle(at.order)
        while at.step < n_batches:
            rows = at.order[at.step * size : (at.step + 1) * size]
            if len(rows) >= 2:  # in-batch negatives need a second pair
                chunk = [pairs[i] for i in rows]
                at.total += _step(tuned, cache, first, chunk, optimiser, config.temperature) * len(rows)
            at.step += 1
            bar.update()
            if checkpoint and at.step < n_batches and checkpoint.due():
                checkpoint.save(at, params, optimiser, at.seconds + time.perf_counter() - start)
        at.losses.append(at.total / len(pairs))
        at.epoch, at.step, at.total = epoch + 1, 0, 0.0
        bar.set_postfix(loss=f"{at.losses[-1]:.3f}")
        if checkpoint:
            checkpoint.save(at, params, optimiser, at.seconds + time.perf_counter() - start)
    bar.close()


def train_encoder(encoder: SentenceEncoder, queries: Sequence[str], paraphrases: Sequence[str],
                  config: EncoderConfig | None = None, progress: bool = True, checkpoint_dir: str | Path | None = None,
                  checkpoint_s: float = 300.0, negatives: Sequence[Sequence[str]] | None = None,
                  ) -> tuple[SentenceEncoder, EncoderTraining]:
    """A tuned copy of `encoder` (the original is left as it was) and a record of the training.
    `negatives`: per pair, hard negatives for its paraphrase (prompts it must not pick).

    With `checkpoint_dir`, the training state is saved there after every epoch and every
    `checkpoint_s` seconds, a later call with the same inputs resumes from it to the same weights
    an uninterrupted run gives, and the checkpoint is removed once training is done."""
    config = (config or EncoderConfig()).validate()
    if len(queries) != len(paraphrases) or len(queries) < 2:
        raise ConfigError(f"train_encoder needs at least 2 (query, paraphrase) pairs, got {len(queries)}")
    start = time.perf_counter()
    tuned = copy.deepcopy(encoder).eval()  # eval: no dropout, so a run is exactly repeatable
    params = trainable_parameters(tuned, config.trainable_layers)
    tuned.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    first = len(tuned.model.get_submodule(layer_stack_path(tuned.model))) - config.trainable_layers
    pairs = list(zip(queries, paraphrases, [tuple(n) for n in negatives] if negatives else [()] * len(queries)))
    texts = [*queries, *paraphrases, *(n for _, _, ns in pairs for n in ns)]
    cache = _CachedInputs(tuned, list(dict.fromkeys(texts)), first, progress=progress)
    cached_s = time.perf_counter() - start
    optimiser = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    at = _Position(list(range(len(pairs))), random.Random(config.seed))
    checkpoint = None if checkpoint_dir is None else _Checkpoint(
        checkpoint_dir, _inputs_digest(encoder, pairs, config, progress), checkpoint_s)
    resumed = checkpoint is not None and checkpoint.restore(at, params, optimiser)
    if resumed:
        log.info("stage B: resuming the encoder's training at epoch %d, batch %d", at.epoch + 1, at.step + 1)
    resumed_at, before_s = [at.epoch, at.step], at.seconds
    _run_epochs(tuned, cache, first, pairs, params, optimiser, config, at, checkpoint, progress)
    tuned.requires_grad_(False)
    timing = {"cache_s": cached_s, "total_s": time.perf_counter() - start + before_s}
    if resumed:
        timing["resumed_at"] = resumed_at  # [epoch, batch]; total_s includes the time before the kill
    if checkpoint:
        checkpoint.path.unlink(missing_ok=True)  # the caller saves the result; the state is not needed
    log.info("encoder tuned on %d pairs in %.0f s (loss %s)", len(pairs), timing["total_s"],
             " -> ".join(f"{x:.3f}" for x in at.losses[:1] + at.losses[-1:]))
    return tuned, EncoderTraining(config, len(pairs), at.losses, timing)


def encoder_delta_record(training: EncoderTraining, base: str) -> dict:
    """The JSON record of a tuned encoder: its base encoder's name and how it was trained."""
    return {"base_encoder": base, "config": asdict(training.config), "n_pairs": training.n_pairs,
            "losses": training.losses, "timing": training.timing}


def save_encoder_delta(tuned: SentenceEncoder, training: EncoderTraining, base: str, path: str | Path) -> Path:
    """The trained layers as safetensors plus JSON (base encoder name, config, losses)."""
    return write_encoder_delta(tuned, encoder_delta_record(training, base), path)


def write_encoder_delta(tuned: SentenceEncoder, record: dict, path: str | Path) -> Path:
    """The layers `record["config"]["trainable_layers"]` names, and the record beside them."""
    path = Path(path)
    atomic_save_tensors(path, dict(trainable_parameters(tuned, record["config"]["trainable_layers"])))
    atomic_write_json(path.with_suffix(".json"), record)
    return path


def load_encoder_delta(path: str | Path, base_encoder: SentenceEncoder | None = None) -> tuple[SentenceEncoder, dict]:
    """The tuned encoder from a delta written by `save_encoder_delta` (loading its base encoder
    unless one is given) and the delta's JSON record."""
    path = Path(path)
    meta = read_record(path, "encoder")
    tensors = load_tensors(path, "encoder delta")
    encoder = copy.deepcopy(base_encoder) if base_encoder is not None else load_encoder(meta["base_encoder"])
    params = trainable_parameters(encoder, meta["config"]["trainable_layers"])
    if set(params) != set(tensors):
        raise MeGError(f"{path}: the delta's tensors do not match encoder {meta['base_encoder']!r}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    return encoder.eval().requires_grad_(False), meta
