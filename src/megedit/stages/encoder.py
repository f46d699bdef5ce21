"""Stage B: tune the sentence encoder so that a paraphrase lands next to its original query.

InfoNCE with in-batch negatives on (query, paraphrase) pairs from a pseudo-edit pool that is
disjoint from the edits (their real paraphrases are unknown at edit time). Only the top
`trainable_layers` layers train, so the layers below are run once over every sentence and their
output is cached (`lm.layer_input`); each step then runs just the trainable layers.

The tuned encoder is saved as a delta: the trained layers' weights plus the base encoder's name,
never the whole encoder.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import layer_stack_path
from ..data.requests import EditRequest
from ..errors import ConfigError, MeGError
from ..io import atomic_save_tensors, atomic_write_json, load_tensors, read_record
from ..lm import layer_input, starting_at_layer
from ..models import SentenceEncoder

log = logging.getLogger(__name__)


@dataclass
class EncoderConfig:
    trainable_layers: int = 1  # the authors train only the last transformer layer
    temperature: float = 0.05  # cosine / temperature; the authors' 1.0 learns far slower here (README)
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 4
    seed: int = 0

    def validate(self) -> "EncoderConfig":
        if self.trainable_layers < 1 or self.batch_size < 2 or self.epochs < 0 or self.temperature <= 0:
            raise ConfigError(f"encoder config: need trainable_layers >= 1, batch_size >= 2, epochs >= 0 and "
                              f"temperature > 0, got {asdict(self)}")
        return self


def paraphrase_pairs(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    """(query, paraphrase) pairs: each request's prompt with each of its rephrases, duplicates removed."""
    pairs = dict.fromkeys((r.prompt, p) for r in requests for p in r.rephrases if p != r.prompt)
    return [q for q, _ in pairs], [p for _, p in pairs]


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

    def __init__(self, encoder: SentenceEncoder, texts: list[str], first_trained: int, batch_size: int = 128) -> None:
        self.index = {t: i for i, t in enumerate(texts)}
        self.ids: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
        slots: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(texts)  # type: ignore[list-item]
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                inputs = encoder.tokenize([texts[i] for i in rows])
                hidden = layer_input(encoder.model, first_trained, inputs)
                for j, i in enumerate(rows):
                    n = int(inputs["attention_mask"][j].sum())
                    slots[i] = (inputs["input_ids"][j, :n].clone(), hidden[j, :n].clone())
        self.ids = [s[0] for s in slots]
        self.hidden = [s[1] for s in slots]

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


def info_nce(paraphrase_emb: torch.Tensor, query_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each paraphrase must pick its own query among all queries in the batch (normalised inputs)."""
    logits = paraphrase_emb @ query_emb.T / temperature
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


def train_encoder(encoder: SentenceEncoder, queries: Sequence[str], paraphrases: Sequence[str],
                  config: EncoderConfig | None = None, progress: bool = True) -> tuple[SentenceEncoder, EncoderTraining]:
    """A tuned copy of `encoder` (the original is left as it was) and a record of the training."""
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
    cache = _CachedInputs(tuned, list(dict.fromkeys([*queries, *paraphrases])), first)
    cached_s = time.perf_counter() - start
    optimiser = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    order = random.Random(config.seed)
    pairs = list(zip(queries, paraphrases))
    losses = []
    bar = tqdm(total=config.epochs * -(-len(pairs) // config.batch_size), desc="training encoder", disable=not progress)
    for _ in range(config.epochs):
        order.shuffle(pairs)
        total = 0.0
        for b in range(0, len(pairs), config.batch_size):
            chunk = pairs[b : b + config.batch_size]
            if len(chunk) < 2:
                continue
            inputs, hidden = cache.batch([q for q, _ in chunk] + [p for _, p in chunk], tuned.tokenizer.pad_token_id)
            with starting_at_layer(tuned.model, first, hidden):
                emb = tuned(**inputs)
            loss = info_nce(emb[len(chunk) :], emb[: len(chunk)], config.temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(chunk)
            bar.update()
        losses.append(total / len(pairs))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    tuned.requires_grad_(False)
    timing = {"cache_s": cached_s, "total_s": time.perf_counter() - start}
    log.info("encoder tuned on %d pairs in %.0f s (loss %s)", len(pairs), timing["total_s"],
             " -> ".join(f"{x:.3f}" for x in losses[:1] + losses[-1:]))
    return tuned, EncoderTraining(config, len(pairs), losses, timing)


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
    from ..models import load_encoder

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
