"""Running a causal LM on batches of token sequences: left padding, greedy decoding,
teacher-forced scoring, HF `generate()` over batches with per-row state, the prompt-length
limit, and running only the layers above a cached hidden state.

Everything here is architecture-generic (it goes through the model's own forward); the one
table in `arch.py` says where the decoder layers are.
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from .arch import layer_stack_path
from .errors import ConfigError, MeGError

try:  # the plain layer of HF's DynamicCache: its keys and values are (B, heads, T, head_dim) tensors
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older transformers: caches are not stacked, trimmed or shared as plain tensors
    DynamicLayer = None


@dataclass
class Batch:
    """Left-padded token ids with their attention mask and position ids."""

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T), 1 on real tokens
    positions: torch.Tensor  # (B, T), 0 at each row's first real token

    @property
    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.positions}


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), positions.to(device))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Decoded:
    forced: list[list[int]]  # teacher-forced argmax before each draft token
    generated: list[list[int]]  # greedy continuation, cut after the first stop token
    forward_s: float = 0.0  # time in the shared prompt + draft pass
    steps_s: float = 0.0  # time in step-by-step greedy decoding after it


@torch.inference_mode()
def decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    drafts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    select_rows: Callable[[torch.Tensor], None] | None = None,
    give_up: Callable[[int, list[int]], bool] | None = None,
    prefix: tuple[Any, int] | None = None,
) -> Decoded:
    """Teacher forcing and greedy decoding of one batch, sharing one forward pass.

    Each prompt is followed by a draft (the expected answer, or a reference output; may be
    empty). One pass over prompt + draft gives the teacher-forced argmax at every draft token.
    Greedy decoding then accepts the draft for as long as the argmax agrees with it (greedy
    output = argmax given its own previous tokens, so the accepted prefix is exactly what greedy
    decoding would produce) and decodes step by step only from the first disagreement. Rows
    drop out of the batch as they finish; `select_rows(index)` is told which rows remain, so
    per-row state outside the model (a per-query neuron) can follow. `give_up(row, tokens)` may
    end a row early once its outcome is decided (e.g. it can no longer equal the target).
    `prefix`: (its cache, n) when every prompt begins with the same n tokens, run once into that cache
    (one row, `plain_cache`); `prompts` then hold each prompt's tokens after them.
    """
    start = time.perf_counter()
    drafts = [list(d)[:max_new_tokens] for d in drafts]
    batch, width = _prompt_and_draft_batch(prompts, drafts, pad_id, model_device(model))
    skip = prefix[1] if prefix else 0
    inputs = after_prefix(model, batch, *prefix) if prefix else batch.model_inputs | {"use_cache": True}
    mask = inputs["attention_mask"]  # the prefix's columns first
    span = max(len(d) for d in drafts) + 1
    out = model(**inputs, logits_to_keep=span)
    predicted = out.logits.argmax(-1).tolist()  # column j predicts draft token j
    forced = [row[: len(d)] for row, d in zip(predicted, drafts)]

    generated: list[list[int]] = [[] for _ in prompts]
    pending, next_tokens, next_positions = [], [], []
    for r, d in enumerate(drafts):
        j = 0
        while True:
            token = predicted[r][j]
            if not _append(generated[r], token, stop_ids, max_new_tokens) or (give_up and give_up(r, generated[r])):
                break
            if j < len(d) and token == d[j]:
                j += 1
                continue
            # disagreement (or end of draft): forget the rest of the draft and decode from here
            mask[r, skip + width + j :] = 0
            pending.append(r)
            next_tokens.append(token)
            next_positions.append(skip + len(prompts[r]) + j)
            break
    forward_s = time.perf_counter() - start
    if pending:
        _continue_greedy(model, output_cache(out), mask, pending, next_tokens, next_positions,
                         generated, max_new_tokens, stop_ids, select_rows, give_up)
    return Decoded(forced, generated, forward_s, time.perf_counter() - start - forward_s)


def _prompt_and_draft_batch(prompts, drafts, pad_id, device) -> tuple[Batch, int]:
    """Prompts left-padded to a common width, drafts right-padded after them."""
    width, span = max(len(p) for p in prompts), max(len(d) for d in drafts)
    ids = torch.full((len(prompts), width + span), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, d) in enumerate(zip(prompts, drafts)):
        ids[r, width - len(p) : width + len(d)] = torch.as_tensor(list(p) + list(d), dtype=torch.long)
        mask[r, width - len(p) : width + len(d)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), positions.to(device)), width


def _continue_greedy(model, cache, mask, rows, tokens, positions, generated, max_new_tokens, stop_ids,
                     select_rows, give_up) -> None:
    """Greedy steps for the unfinished rows, feeding each its last token; rows leave when done."""
    device = mask.device
    rows, tokens, positions = list(rows), list(tokens), list(positions)
    current = list(range(len(generated)))  # batch rows the cache and `mask` still hold
    while rows:
        if rows != current:
            keep = torch.tensor([current.index(r) for r in rows], device=device)
            cache.batch_select_indices(keep)
            mask = mask[keep]
            if select_rows is not None:
                select_rows(keep)
            current = list(rows)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                    position_ids=torch.tensor(positions, device=device)[:, None],
                    use_cache=True, **cache_kwargs(model, cache))
        step = out.logits[:, -1].argmax(-1).tolist()
        still = [(r, t, p + 1) for r, t, p in zip(rows, step, positions)
                 if _append(generated[r], t, stop_ids, max_new_tokens) and not (give_up and give_up(r, generated[r]))]
        rows, tokens, positions = [x[0] for x in still], [x[1] for x in still], [x[2] for x in still]


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The KV cache as a forward argument: transformers 5.x renamed past_key_values to cache (the
    old name warns on every call from then on); the installed version's own name."""
    return {_cache_name(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_name(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def plain_cache(cache) -> bool:
    """Whether a cache can be stacked, trimmed and shared as plain tensors: HF's dynamic cache with
    full-attention layers only (sliding-window layers keep a rolling window whose bookkeeping a
    plain stack would break)."""
    layers = getattr(cache, "layers", None)
    return (DynamicLayer is not None and bool(layers)
            and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers))


def shared_cache(cache, rows: int):
    """A plain cache of one row (`plain_cache`) as a new cache of `rows` rows that share its tensors
    (views, no copy); a forward appends to the new one and leaves `cache` as it was."""
    shared = copy.copy(cache)
    shared.layers = []
    for layer in cache.layers:
        view = copy.copy(layer)
        view.keys, view.values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
        shared.layers.append(view)
    return shared


@torch.no_grad()
def prefix_cache(model: nn.Module, ids: Sequence[int]):
    """The keys and values of `ids` run once (one row), for rows that go on after them (`after_prefix`);
    None where the model's cache is not a plain one (`plain_cache`): such rows run whole."""
    cache = output_cache(model(input_ids=torch.tensor([list(ids)], device=model_device(model)), use_cache=True))
    return cache if plain_cache(cache) else None


def after_prefix(model: nn.Module, batch: Batch, cache, skip: int) -> dict:
    """Forward arguments for `batch`'s rows going on after a prefix of `skip` tokens that every row shares,
    whose keys and values `cache` holds once (one row, `plain_cache`): the prefix's columns in the mask,
    positions after it, and the cache shared by every row (the prefix is not run again)."""
    rows = batch.ids.shape[0]
    return {"input_ids": batch.ids, "attention_mask": torch.cat([batch.mask.new_ones(rows, skip), batch.mask], dim=1),
            "position_ids": batch.positions + skip, "use_cache": True, **cache_kwargs(model, shared_cache(cache, rows))}


def output_cache(out):
    cache = getattr(out, "cache", None)  # the newer name; reading past_key_values warns there
    return out.past_key_values if cache is None else cache


def _append(generated: list[int], token: int, stop_ids: set[int], max_new_tokens: int) -> bool:
    """Add a decoded token; True while the row should go on decoding."""
    generated.append(token)
    return token not in stop_ids and len(generated) < max_new_tokens


def token_id_set(ids) -> set[int]:
    """Token ids given as None, one int, or a list / tensor of them, as a set."""
    if ids is None:
        return set()
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return {ids} if isinstance(ids, int) else {int(i) for i in ids}


def end_of_turn_ids(model: nn.Module, tokenizer) -> list[int]:
    """Tokens that end an assistant turn: the tokenizer's EOS and the model's generation EOS
    (e.g. <|im_end|> for SmolLM2, <end_of_turn> besides <eos> for Gemma)."""
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted(token_id_set(tokenizer.eos_token_id) | token_id_set(generation_eos))


def context_length(model: nn.Module) -> int | None:
    """The most positions the model takes (config.max_position_embeddings; gpt2 maps n_positions
    to it), None where the config does not say."""
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def prompt_limit(model: nn.Module, max_prompt_tokens: int | None = None) -> int | None:
    """The longest prompt allowed, in tokens: `max_prompt_tokens` when set, else the model's context."""
    if max_prompt_tokens is None:
        return context_length(model)
    if type(max_prompt_tokens) is not int or max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be a positive integer, found {max_prompt_tokens!r}")
    return max_prompt_tokens


def check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], limit: int | None,
                         names: Sequence[str] | None = None) -> None:
    """Refuse the first prompt longer than `limit` tokens with a one-line error naming it (its
    index, or `names[i]`) and its length: past the model's context a forward pass is slow (minutes
    for tens of thousands of tokens) and its output meaningless."""
    if limit is None:
        return
    for i, ids in enumerate(prompt_ids):
        if len(ids) > limit:
            name = names[i] if names is not None else f"prompt {i}"
            raise MeGError(f"{name} is {len(ids)} tokens long; the limit is {limit} tokens (the model's context, "
                           f"or max_prompt_tokens where set): shorten it")


def generation_rows(model: nn.Module, kwargs: dict) -> int:
    """Rows HF `generate()` runs per prompt: it repeats each prompt's row (repeat_interleave)
    max(num_beams, num_return_sequences) times, so per-row state must be repeated the same way."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name: str) -> int:
        value = kwargs.get(name, getattr(config, name, None))
        return value if isinstance(value, int) and value > 0 else 1

    return max(setting("num_beams"), setting("num_return_sequences"))


def hf_generate(model: nn.Module, prompt_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
                rows_context: Callable[[list[int], int], ContextManager] | None = None,
                **kwargs) -> list[tuple[list[int], int, Any]]:
    """HF `generate()` over left-padded batches of `prompt_ids`, in the given order (a single batch
    keeps the caller's order in HF's output). `rows_context(idx, repeat)` is entered around each
    batch (prompts `idx`, each run as `repeat` rows), e.g. to set per-row neuron vectors.
    Returns (idx, prompt width, generate's output) per batch."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, found {batch_size!r}")
    kwargs.setdefault("pad_token_id", pad_id)
    repeat, device, results = generation_rows(model, kwargs), model_device(model), []
    for start in range(0, len(prompt_ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompt_ids))))
        batch = left_pad([prompt_ids[i] for i in idx], pad_id, device)
        with rows_context(idx, repeat) if rows_context else nullcontext():
            out = model.generate(input_ids=batch.ids, attention_mask=batch.mask, **kwargs)
        results.append((idx, batch.ids.shape[1], out))
    return results


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the wanted hidden state is in hand."""


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def layer_input(model: nn.Module, layer: int, batch: Batch | dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden state entering transformer layer `layer` (B, T, d); layers above it are not run.
    `batch`: an LM batch, or the keyword inputs of any transformer (a sentence encoder's; `after_prefix`'s)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(_hidden_arg(args, kwargs))
        raise _Captured

    handle = model.get_submodule(layer_stack_path(model))[layer].register_forward_pre_hook(hook, with_kwargs=True)
    inputs = batch.model_inputs if isinstance(batch, Batch) else batch
    try:
        model(**{"use_cache": False, **inputs})
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


@contextmanager
def starting_at_layer(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward pass runs only layers `layer`.. with `hidden` as their input.

    The lower layers' output never changes while editing above them, so it is computed once
    (`layer_input`) and reused for every optimisation step. The model's forward still builds
    masks and position embeddings from the batch it is given, which must match `hidden`.
    """
    parent_path, attr = layer_stack_path(model).rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    full = getattr(parent, attr)

    def hook(module, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = full[layer].register_forward_pre_hook(hook, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList(list(full)[layer:]))
    try:
        yield
    finally:
        handle.remove()
        setattr(parent, attr, full)
