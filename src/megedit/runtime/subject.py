"""What the runtime runs: the base model plus whatever an editing method adds, for a batch of queries.

The greedy decoder (runtime/decoding.py), and so the harness (eval/), runs every subject with the
same code; a subject only says what to switch on for a batch of queries
(`batch_context`, given the batch's queries; it may yield a `select_rows(index)` callback for
rows leaving the batch, e.g. MeG's per-query neuron) and how to get the unedited model back
(`unedited`, for the pre-edit locality references), and which queries it leaves exactly as the
unedited model (`unchanged`: the harness gives those locality queries the pre-edit answers,
which is what decoding them gives, instead of decoding them again). A subject may also say how
many leading tokens of a batch's prompts it runs alike for every row (`shared_prefix`, e.g. a
chat opening), which the decoder then runs once for the whole batch.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..data.prompts import PRESETS, PromptFormat
from ..errors import MeGError
from ..io import atomic_save_tensors, atomic_write_json, load_tensors, read_record
from ..models import model_fingerprint
from ..neuron import attach_neuron


@dataclass(frozen=True)
class Query:
    """One scored query: which edit it belongs to, what it tests, and its raw text."""

    case_id: str
    kind: str  # "reliability", "generality" or "locality"
    text: str  # the raw query; the prompt format wraps it
    target: str | None  # the edit's target (None for locality)


@runtime_checkable
class Subject(Protocol):
    model: nn.Module
    tokenizer: object
    method: str

    def batch_context(self, queries: Sequence[Query]) -> ContextManager: ...

    def unedited(self) -> ContextManager: ...

    def unchanged(self, queries: Sequence[Query]) -> list[bool]: ...

    def describe(self) -> dict: ...


class PlainSubject:
    """The unedited model (`--method none`)."""

    method = "none"

    def __init__(self, model: nn.Module, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def batch_context(self, queries: Sequence[Query]) -> ContextManager:
        return nullcontext()

    def unedited(self) -> ContextManager:
        return nullcontext()

    def unchanged(self, queries: Sequence[Query]) -> list[bool]:
        """Which queries this subject provably answers as the unedited model does. None here: a
        subject that cannot show it (a weight edit changes every query) has all of them decoded."""
        return [False] * len(queries)

    def shared_prefix(self, prompt_ids: Sequence[Sequence[int]]) -> int:
        """How many leading tokens of these prompts every row shares and this subject runs alike for
        every row, so that the decoder may run them once (under `prefix_context`): here the prompts'
        common prefix, when the subject adds no per-row state (its batch_context is the plain one)."""
        return common_prefix(prompt_ids) if type(self).batch_context is PlainSubject.batch_context else 0

    def prefix_context(self) -> ContextManager:
        return nullcontext()

    def describe(self) -> dict:
        return {}


class WeightEditSubject(PlainSubject):
    """A model whose weights a method changed in place (FT, MEMIT, ...); the originals are kept
    so that `unedited()` can swap them back exactly, without float round-off."""

    def __init__(self, model: nn.Module, tokenizer, method: str, originals: dict[str, torch.Tensor],
                 settings: dict) -> None:
        super().__init__(model, tokenizer)
        self.method, self.originals, self.settings = method, originals, settings

    @contextmanager
    def unedited(self) -> Iterator[None]:
        params = dict(self.model.named_parameters())
        edited = {name: params[name].data for name in self.originals}
        for name, original in self.originals.items():
            params[name].data = original
        try:
            yield
        finally:
            for name, tensor in edited.items():
                params[name].data = tensor

    def restore(self) -> None:
        """Put the original weights back for good."""
        params = dict(self.model.named_parameters())
        for name, original in self.originals.items():
            params[name].data = original

    def describe(self) -> dict:
        return dict(self.settings)

    def save(self, path) -> None:
        """The weight deltas (edited - original) as safetensors, the method, its settings and the
        base model's fingerprint as JSON beside them; never the base weights."""
        params = dict(self.model.named_parameters())
        with self.unedited():
            fingerprint = model_fingerprint(self.model)
        atomic_save_tensors(path, {n: params[n].detach() - o for n, o in self.originals.items()})
        atomic_write_json(Path(path).with_suffix(".json"), {"method": self.method, "base_fingerprint": fingerprint,
                                                            "settings": self.settings})

    @classmethod
    def load(cls, path, model: nn.Module, tokenizer) -> "WeightEditSubject":
        """Apply saved weight deltas to `model` (the base model they were made on; checked)."""
        meta = read_record(path, "weight delta", lambda m: {k: m[k] for k in ("method", "base_fingerprint", "settings")})
        if model_fingerprint(model) != meta["base_fingerprint"]:
            raise MeGError(f"{path}: these weight deltas were made for another base model")
        deltas, params = load_tensors(path, "weight delta"), dict(model.named_parameters())
        unknown = sorted(set(deltas) - set(params))
        if unknown or any(deltas[n].shape != params[n].shape for n in deltas):
            raise MeGError(f"{path}: the deltas do not fit this model ({unknown[:1] or 'shape mismatch'})")
        originals = {n: params[n].detach().clone() for n in deltas}
        with torch.no_grad():
            for n, d in deltas.items():
                params[n].add_(d.to(params[n].device, params[n].dtype))
        return cls(model, tokenizer, meta["method"], originals, meta["settings"])


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """The length of the prefix every sequence shares, short of the shortest sequence's last token."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        n = next((k for k in range(n) if s[k] != first[k]), n)
    return max(n, 0)


def as_subject(obj) -> Subject:
    """A Subject from a Subject, or from a plain `(model, tokenizer)` pair."""
    if isinstance(obj, Subject):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        return PlainSubject(*obj)
    raise TypeError(f"expected a Subject or a (model, tokenizer) pair, found {type(obj).__name__}")


class NeuronSubject(PlainSubject):
    """A model with a dynamic neuron whose per-row vectors come from `vectors(queries)`
    ((B, size) tensor; zero rows leave a query untouched). With the neuron switched off,
    the model is exactly the base model, which is what `unedited()` does."""

    def __init__(self, model: nn.Module, tokenizer, neuron, vectors, method: str, settings: dict | None = None):
        super().__init__(model, tokenizer)
        self.neuron, self.vectors, self.method, self.settings = neuron, vectors, method, settings or {}

    @contextmanager
    def batch_context(self, queries: Sequence[Query]) -> Iterator:
        with self.neuron.applied(self.vectors(queries)):
            yield lambda index: self.neuron.set_weights(self.neuron.weights[index.to(self.neuron.weights.device)])

    @contextmanager
    def unedited(self) -> Iterator[None]:
        previous = self.neuron.enabled
        self.neuron.enabled = False
        try:
            yield
        finally:
            self.neuron.enabled = previous

    def unchanged(self, queries: Sequence[Query]) -> list[bool]:
        """The queries whose neuron vector is zero: the neuron adds exactly 0.0 to them."""
        return (self.vectors(queries) == 0).all(dim=1).tolist()

    def shared_prefix(self, prompt_ids: Sequence[Sequence[int]]) -> int:
        """The chat opening the neuron is quiet on, when every prompt begins with it (the base model's
        states there, whatever the rows' vectors); else none: the neuron acts on every other token."""
        opening = self.neuron.opening
        return len(opening) if opening and common_prefix(prompt_ids) >= len(opening) and \
            tuple(prompt_ids[0][: len(opening)]) == opening else 0

    def prefix_context(self) -> ContextManager:
        return self.unedited()

    def describe(self) -> dict:
        return dict(self.settings)


def attach_spec(model: nn.Module, tokenizer, spec, fmt: PromptFormat | None = None):
    """A neuron per `spec` on `model`; when the spec keeps it quiet on a chat opening, quiet on the opening
    of `fmt` (a chat format) or of the tokenizer's own template (what chats are sent in)."""
    neuron = attach_neuron(model, spec.layer, spec.variant, spec.quiet_opening)
    if spec.quiet_opening and getattr(tokenizer, "chat_template", None):
        neuron.quiet_on((fmt if fmt is not None and fmt.chat else PRESETS["chat"]).opening_ids(tokenizer))
    return neuron


def vector_table_subject(model: nn.Module, tokenizer, spec, table: dict, key: Callable[[Query], str], method: str,
                         settings: dict | None = None) -> NeuronSubject:
    """The model with a neuron attached (per `spec`) and set, per query, to `table[key(query)]`;
    queries with no entry get the zero vector (the base model). Detach with `.neuron.detach()`."""
    neuron = attach_spec(model, tokenizer, spec)
    zero = torch.zeros(spec.size)
    return NeuronSubject(model, tokenizer, neuron, lambda qs: torch.stack([table.get(key(q), zero) for q in qs]),
                         method, settings)
