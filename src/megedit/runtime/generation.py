"""The bridge to HF `generate()` with a per-row neuron: each prompt's neuron vector follows its
rows (beams and return sequences included), HF's streamers, sampling seeded without touching the
caller's RNG, and the answers cut at their first end token."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import TextStreamer

from ..errors import ConfigError
from ..lm import hf_generate, model_device, token_id_set
from ..neuron import DynamicNeuron


def streamer_batch_size(kwargs: dict, n_prompts: int, batch_size: int) -> int:
    """The batch size generate() runs at: one call for every prompt when a streamer is given (it
    sees each row once); HF's text streamers take one prompt only."""
    if kwargs.get("streamer") is None:
        return batch_size
    if isinstance(kwargs["streamer"], TextStreamer) and n_prompts != 1:  # HF's text streamers take one row
        raise ConfigError(f"a streamer takes one prompt at a time, found {n_prompts} prompts (a "
                          f"BaseStreamer of your own can take them all as one batch)")
    return max(1, n_prompts)


def check_row_vectors(vectors: torch.Tensor | None, n_prompts: int, size: int) -> None:
    """Vectors given in place of the routing need one row of the neuron's size per prompt."""
    if vectors is not None and tuple(vectors.shape) != (n_prompts, size):
        raise ConfigError(f"vectors must have shape ({n_prompts}, {size}) (one row per prompt), "
                          f"found {tuple(vectors.shape)}")


def generate_answers(model, tokenizer, neuron: DynamicNeuron, ids: list[list[int]], vectors: torch.Tensor | None,
                     stops: list[int], max_new_tokens: int, batch_size: int, seed: int | None, kwargs: dict):
    """HF generate() on prompt token ids, prompt i's rows run with neuron vector `vectors[i]`
    (None only when there are no prompts). Greedy and ending at `stops` unless the caller's
    `kwargs` say otherwise. Returns one text per prompt, a list per prompt with several return
    sequences, or HF's output as is with return_dict_in_generate=True (all prompts in one batch)."""
    if "generation_config" not in kwargs:  # greedy and the format's stops unless the caller says otherwise
        kwargs = {"do_sample": False, "eos_token_id": stops, **kwargs}
    if kwargs.get("stop_strings") and "tokenizer" not in kwargs:
        kwargs["tokenizer"] = tokenizer  # HF needs it to match stop strings
    raw = bool(kwargs.get("return_dict_in_generate"))
    device = model_device(model)
    if ids:
        vectors = vectors.to(device)

    def rows(idx: list[int], repeat: int):
        return neuron.applied(vectors[idx].repeat_interleave(repeat, dim=0))

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with seeded(seed, device):
        batches = hf_generate(model, ids, pad, len(ids) if raw else batch_size, rows,
                              **kwargs, max_new_tokens=max_new_tokens)
    if raw:
        return batches[0][2] if batches else None
    config = kwargs.get("generation_config") or model.generation_config
    return _answers(tokenizer, batches, len(ids), token_id_set(kwargs.get("eos_token_id", config.eos_token_id)))


def _answers(tokenizer, batches: list, n: int, ends: set[int]) -> list:
    """Each output row's new tokens up to its first end token, decoded; grouped per prompt
    when generate() returned several rows per prompt."""
    texts: list[list[str]] = [[] for _ in range(n)]
    per = 1
    for idx, width, out in batches:
        rows = out[:, width:].tolist()
        per = len(rows) // len(idx)
        for k, i in enumerate(idx):
            texts[i] = [_decode_answer(tokenizer, r, ends) for r in rows[k * per : (k + 1) * per]]
    return [t[0] for t in texts] if per == 1 else texts


def _decode_answer(tokenizer, tokens: list[int], ends: set[int]) -> str:
    # rows that stop early are padded by generate(); the first end token closes the answer
    cut = next((j + 1 for j, t in enumerate(tokens) if t in ends), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the sampling RNG for one call, leaving the caller's RNG state as it was."""
    if seed is None:
        yield
        return
    if type(seed) is not int:
        raise ConfigError(f"seed must be an integer, found {seed!r}")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
