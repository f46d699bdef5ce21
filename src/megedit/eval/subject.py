"""What the harness evaluates: anything that can run the LM for a batch of queries.

A subject is the base model plus whatever a method adds. The harness decodes and scores every
subject with the same code; a subject only says what to switch on for a batch of queries
(`batch_context`, e.g. MeG's per-query neuron) and how to get the unedited model back
(`unedited`, for the pre-edit locality references).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Subject(Protocol):
    model: nn.Module
    tokenizer: object
    method: str

    def batch_context(self, queries: Sequence[str]) -> ContextManager: ...

    def unedited(self) -> ContextManager: ...

    def describe(self) -> dict: ...


class PlainSubject:
    """The unedited model (`--method none`)."""

    method = "none"

    def __init__(self, model: nn.Module, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def batch_context(self, queries: Sequence[str]) -> ContextManager:
        return nullcontext()

    def unedited(self) -> ContextManager:
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


def as_subject(obj) -> Subject:
    """A Subject from a Subject, or from a plain `(model, tokenizer)` pair."""
    if isinstance(obj, Subject):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        return PlainSubject(*obj)
    raise TypeError(f"expected a Subject or a (model, tokenizer) pair, found {type(obj).__name__}")
