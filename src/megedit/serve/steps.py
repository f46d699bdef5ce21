"""Decoding steps for continuous batching: the rows being answered decode together, one token per
row per step, in one left-padded batch with one KV cache. A row leaves the batch when its answer
ends; rows that arrive meanwhile run their prompts as a batch of their own (a prefill) and their
cache is then joined to the running one, so nobody waits for the longest answer of a batch.

Each row keeps its own neuron vector (zero: the base model) and its own sampling settings; the
vectors are set on the neuron around every forward pass, so a row's answer does not depend on
which rows share its steps (up to floating-point effects of the batch shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..lm import cache_kwargs, left_pad, model_device, output_cache, plain_cache  # the runtime's own cache plumbing


@dataclass
class Sampling:
    """How one row picks its next token: greedy (temperature 0) or sampled from its own RNG."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


def pick(logits: torch.Tensor, sampling: Sampling) -> int:
    """The next token from one row's logits (V,): argmax, or a draw after temperature and top-p
    (the smallest set of tokens whose probability reaches top_p; the likeliest is always kept)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ranked, order = probs.sort(descending=True)
        ranked[ranked.cumsum(-1) - ranked >= sampling.top_p] = 0  # the mass before it already reached top_p
        probs = torch.zeros_like(probs).scatter_(0, order, ranked)
    return int(torch.multinomial(probs, 1, generator=sampling.generator))


class Cohort:
    """Rows decoding together: their KV cache, attention mask (B, T), next positions and neuron
    vectors (B, size). Built by `prefill`, advanced by `step`, shrunk by `keep`, grown by `join`."""

    def __init__(self, model: nn.Module, neuron, cache, mask: torch.Tensor, positions: list[int],
                 vectors: torch.Tensor) -> None:
        self.model, self.neuron, self.cache, self.mask = model, neuron, cache, mask
        self.positions, self.vectors = positions, vectors
        self.joinable = plain_cache(cache)

    def __len__(self) -> int:
        return len(self.positions)

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model: nn.Module, neuron, seqs: list[list[int]], vectors: torch.Tensor,
                pad_id: int) -> tuple["Cohort", torch.Tensor]:
        """Run whole token sequences (a prompt, plus any tokens already answered) as one batch;
        returns the cohort and each row's next-token logits (B, V) on the CPU."""
        batch = left_pad(seqs, pad_id, model_device(model))
        vectors = vectors.to(batch.ids.device)
        with neuron.applied(vectors):
            out = model(**batch.model_inputs, use_cache=True, logits_to_keep=1)
        cohort = cls(model, neuron, output_cache(out), batch.mask, [len(s) for s in seqs], vectors)
        return cohort, out.logits[:, -1].float().cpu()

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its last token; returns the next-token logits (B, V) on the CPU. The
        cache grows in place: after an exception the cohort is not to be used again."""
        device = self.mask.device
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        with self.neuron.applied(self.vectors):
            out = self.model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                             position_ids=torch.tensor(self.positions, device=device)[:, None],
                             use_cache=True, **cache_kwargs(self.model, self.cache))
        self.mask, self.positions = mask, [p + 1 for p in self.positions]
        return out.logits[:, -1].float().cpu()

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices, in order), then drop cache columns no row uses any more."""
        if rows == list(range(len(self))):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.vectors = self.mask[index], self.vectors[index]
        self.positions = [self.positions[i] for i in rows]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start and self.joinable:  # left padding every row has: the longest prompt has gone
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]

    def join(self, other: "Cohort") -> None:
        """Append `other`'s rows: both caches left-padded to a common width, then stacked."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(other.mask, width, -1)])
        self.positions = self.positions + other.positions
        self.vectors = torch.cat([self.vectors, other.vectors])


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros in front along `dim` up to `width` (a zero mask column: attention never looks there)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
