"""The generator kinds, by name: the one place a kind's name meets its code.

A kind is an object with the members of `GeneratorKind`, defined beside its network (dit.py,
mlp.py, lookup.py); adding one is a new file and one entry in `GENERATOR_KINDS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ...errors import ConfigError
from .diffusion import Diffusion
from .dit import DiTKind
from .lookup import LookupKind
from .mlp import MLPKind


class GeneratorKind(Protocol):
    trains: bool  # False: the network is built from the training pairs (`from_pairs`), no optimiser steps

    def network(self, config, length: int, cond_dim: int) -> nn.Module:
        """A fresh network for vectors of `length` from conditions of `cond_dim` (seeded by the caller)."""

    def diffusion(self, config) -> Diffusion | None:
        """How vectors are sampled from the network; None: the network gives them in one pass."""

    def saved_settings(self, net: nn.Module) -> dict:
        """Settings written into the saved config besides the GeneratorConfig's own."""

    def saved_network(self, path: Path, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
        """The network a saved file holds where its tensors are the network; None: build it from
        the config and load the tensors into it."""

    def from_pairs(self, cond: torch.Tensor, x: torch.Tensor) -> nn.Module:
        """Kinds that do not train: the network of these (condition, normalised vector) pairs."""

    def describe(self, net: nn.Module, config) -> str:
        """One line for `megedit inspect`."""


# in the order the CLI lists them; "lookup" is the default (GeneratorConfig.kind)
GENERATOR_KINDS: dict[str, GeneratorKind] = {"dit": DiTKind(), "mlp": MLPKind(), "lookup": LookupKind()}


def generator_kind(name: str) -> GeneratorKind:
    """The kind called `name`; a ConfigError naming the known ones for anything else."""
    if name not in GENERATOR_KINDS:
        raise ConfigError(f"generator kind must be one of {', '.join(GENERATOR_KINDS)}, found {name!r}")
    return GENERATOR_KINDS[name]
