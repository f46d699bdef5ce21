"""The dynamic neuron: one extra hidden unit in one MLP, with its weights given per batch row.

For MLP input `x` (hidden size d) at every position, the neuron adds to the MLP output

    linear     Δ = u (aᵀx)                 w = [a; u]        length 2d   (default for gated MLPs)
    activated  Δ = u act(aᵀx + b)          w = [a; b; u]     length 2d+1 (default for plain MLPs)
    gated      Δ = u (act(gᵀx) · aᵀx)      w = [a; g; u]     length 3d

where `act` is the MLP's own activation module. Row i of the batch uses `w[i]`; `w = 0` (or no
weights, or the neuron switched off) leaves the MLP output bit-for-bit unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .arch import arch_spec, check_layer, hidden_size, mlp_activation
from .errors import ConfigError

VARIANTS = ("linear", "activated", "gated")


@dataclass(frozen=True)
class NeuronSpec:
    """What a neuron vector means: its layer, its variant and the model's hidden size."""

    layer: int
    variant: str
    hidden: int

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"neuron variant must be one of {VARIANTS}, found {self.variant!r}")

    @property
    def size(self) -> int:
        """Length of one neuron vector w."""
        d = self.hidden
        return {"linear": 2 * d, "activated": 2 * d + 1, "gated": 3 * d}[self.variant]

    def delta(self, x: torch.Tensor, w: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """The neuron's contribution for hidden states x (B, T, d) and vectors w (B, size)."""
        d = self.hidden
        w = w.to(device=x.device, dtype=x.dtype)
        a, u = w[:, :d], w[:, -d:]
        pre = torch.einsum("btd,bd->bt", x, a)
        if self.variant == "activated":
            pre = act(pre + w[:, d : d + 1])
        elif self.variant == "gated":
            pre = act(torch.einsum("btd,bd->bt", x, w[:, d : 2 * d])) * pre
        return pre.unsqueeze(-1) * u.unsqueeze(1)

    def initial_vector(self, seed: int = 0) -> torch.Tensor:
        """The fixed starting vector of every fitted neuron: nn.Linear's default uniform init.

        Every part is drawn from U(-1/sqrt(d), 1/sqrt(d)); u must not start at zero, or the
        gradient of a (product form) would vanish.
        """
        g = torch.Generator().manual_seed(seed)
        bound = self.hidden**-0.5
        return (torch.rand(self.size, generator=g) * 2 - 1) * bound

    def to_dict(self) -> dict:
        return {"layer": self.layer, "variant": self.variant, "hidden": self.hidden}


def default_variant(model: nn.Module) -> str:
    """The authors' choice: a linear neuron in gated MLPs, an activated one in plain MLPs."""
    return "linear" if arch_spec(model).gated else "activated"


def neuron_spec(model: nn.Module, layer: int, variant: str | None = None) -> NeuronSpec:
    return NeuronSpec(check_layer(model, layer), variant or default_variant(model), hidden_size(model))


class NeuronMLP(nn.Module):
    """Stands in for one MLP: runs it unchanged, then adds the dynamic neuron's output."""

    def __init__(self, mlp: nn.Module, spec: NeuronSpec, act: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.spec = spec
        self._act = [act]  # a list keeps the MLP's own activation out of this module's children
        self.weights: torch.Tensor | None = None
        self.enabled = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.mlp(x, *args, **kwargs)
        w = self.weights
        if w is None or not self.enabled:
            return out
        if w.shape[0] != x.shape[0]:
            # generate() with beams or several return sequences repeats each prompt's row
            if x.shape[0] % w.shape[0]:
                raise ConfigError(f"neuron has weights for {w.shape[0]} rows, the batch has {x.shape[0]}")
            w = w.repeat_interleave(x.shape[0] // w.shape[0], dim=0)
        return out + self.spec.delta(x, w, self._act[0])


class DynamicNeuron:
    """A neuron attached to one MLP of a model. Create it with `attach_neuron`."""

    def __init__(self, model: nn.Module, layer: int, variant: str | None = None) -> None:
        arch = arch_spec(model)
        self.spec = neuron_spec(model, layer, variant)
        self._parent = model.get_submodule(f"{arch.layers_path}.{layer}")
        self._attr = arch.mlp_attr
        original = getattr(self._parent, self._attr)
        if isinstance(original, NeuronMLP):
            raise ConfigError(f"layer {layer} already has a neuron attached; detach it first")
        self.original = original
        self.module = NeuronMLP(original, self.spec, mlp_activation(original, arch))
        setattr(self._parent, self._attr, self.module)

    @property
    def attached(self) -> bool:
        return getattr(self._parent, self._attr) is self.module

    @property
    def enabled(self) -> bool:
        return self.module.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.module.enabled = bool(value)

    @property
    def weights(self) -> torch.Tensor | None:
        return self.module.weights

    def set_weights(self, w: torch.Tensor | None) -> None:
        """One vector per batch row, shape (B, size); a single (size,) vector serves every row."""
        if w is not None:
            if w.dim() == 1:
                w = w.unsqueeze(0)
            if w.dim() != 2 or w.shape[1] != self.spec.size:
                raise ConfigError(
                    f"neuron weights must have shape (rows, {self.spec.size}), found {tuple(w.shape)}"
                )
        self.module.weights = w

    @contextmanager
    def applied(self, w: torch.Tensor | None) -> Iterator["DynamicNeuron"]:
        """Use `w` inside the block, then restore whatever weights were set before."""
        previous = self.module.weights
        self.set_weights(w)
        try:
            yield self
        finally:
            self.module.weights = previous

    def attach(self) -> "DynamicNeuron":
        """Put the neuron back after `detach` (weights start unset)."""
        if not self.attached:
            setattr(self._parent, self._attr, self.module)
        return self

    def detach(self) -> nn.Module:
        """Put the original MLP object back; returns it."""
        if self.attached:
            setattr(self._parent, self._attr, self.original)
        self.module.weights = None
        return self.original


def attach_neuron(model: nn.Module, layer: int, variant: str | None = None) -> DynamicNeuron:
    """Attach a dynamic neuron to the MLP of decoder layer `layer` (0-based)."""
    return DynamicNeuron(model, layer, variant)
