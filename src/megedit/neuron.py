"""The dynamic neuron: one extra hidden unit in one MLP, with its weights given per batch row.

For MLP input `x` (hidden size d) at every position, the neuron adds to the MLP output

    linear     Δ = u (aᵀx)                 w = [a; u]        length 2d   (default for gated MLPs)
    activated  Δ = u act(aᵀx + b)          w = [a; b; u]     length 2d+1 (default for plain MLPs)
    gated      Δ = u (act(gᵀx) · aᵀx)      w = [a; g; u]     length 3d

where `act` is the MLP's own activation module. Row i of the batch uses `w[i]`; `w = 0` (or no
weights, or the neuron switched off) leaves the MLP output bit-for-bit unchanged.

A neuron may be quiet on a fixed opening (`DynamicNeuron.quiet_on`): a row whose first tokens are
that opening (a chat template's system turn and user header) gets no neuron output there. The
opening then passes through the model as through the base model, so stage A computes it once for
every chat row (its keys and values above the neuron's layer never change).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

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
    quiet_opening: bool = False  # off on the chat template's opening (DynamicNeuron.quiet_on); packs before it: False

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
        return {"layer": self.layer, "variant": self.variant, "hidden": self.hidden, "quiet_opening": self.quiet_opening}


def default_variant(model: nn.Module) -> str:
    """The authors' choice: a linear neuron in gated MLPs, an activated one in plain MLPs."""
    return "linear" if arch_spec(model).gated else "activated"


def neuron_spec(model: nn.Module, layer: int, variant: str | None = None, quiet_opening: bool = False) -> NeuronSpec:
    return NeuronSpec(check_layer(model, layer), variant or default_variant(model), hidden_size(model), quiet_opening)


class NeuronMLP(nn.Module):
    """Stands in for one MLP: runs it unchanged, then adds the dynamic neuron's output."""

    def __init__(self, mlp: nn.Module, spec: NeuronSpec, act: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.spec = spec
        self._act = [act]  # a list keeps the MLP's own activation out of this module's children
        self.weights: torch.Tensor | None = None
        self.enabled = True
        self.quiet: torch.Tensor | None = None  # (B, T) True where this forward's tokens are the opening

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
        delta = self.spec.delta(x, w, self._act[0])
        if self.quiet is not None and self.quiet.shape == x.shape[:2]:
            delta = delta.masked_fill(self.quiet.unsqueeze(-1), 0.0)
        return out + delta


def _positions(ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Each token's position in its row (0 at the first real token) for a forward's inputs: the
    position ids given, else counted along the attention mask (left padding), else the cache's."""
    t = ids.shape[1]
    if kwargs.get("position_ids") is not None and kwargs["position_ids"].dim() == 2:
        return kwargs["position_ids"].expand(ids.shape[0], t)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return (mask.long().cumsum(-1) - 1)[:, -t:]
    start = kwargs.get("cache_position")
    first = int(start[0]) if start is not None and start.numel() else 0
    return torch.arange(first, first + t, device=ids.device).expand(ids.shape[0], t)


def opening_mask(ids: torch.Tensor, positions: torch.Tensor, opening: torch.Tensor,
                 real: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B, T) True on the tokens of rows that begin with `opening`, at the opening's positions;
    None when no token of this forward lies inside an opening. A row counts only when its whole
    opening is in this forward (a prompt's first pass)."""
    n = len(opening)
    early = positions < n
    if real is not None:
        early &= real.bool()
    if not bool(early.any()):
        return None
    agree = ~early | (ids == opening[positions.clamp(0, n - 1)])
    rows = agree.all(1) & (early.sum(1) == n)
    return early & rows.unsqueeze(1)


class DynamicNeuron:
    """A neuron attached to one MLP of a model. Create it with `attach_neuron`."""

    def __init__(self, model: nn.Module, layer: int, variant: str | None = None, quiet_opening: bool = False) -> None:
        arch = arch_spec(model)
        self.spec = neuron_spec(model, layer, variant, quiet_opening)
        self._stack = model.get_submodule(arch.layers_path.rsplit(".", 1)[0]) if "." in arch.layers_path else model
        self._hook = None
        self.opening: tuple[int, ...] = ()  # the token ids it is quiet on (quiet_on)
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

    def quiet_on(self, opening: Sequence[int]) -> None:
        """Keep the neuron off on `opening` (token ids) wherever a row begins with it; an empty
        opening switches that off. The spec must say so (`quiet_opening`), so packs record it."""
        if opening and not self.spec.quiet_opening:
            raise ConfigError("this neuron's spec has quiet_opening=False; it acts on every token")
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.module.quiet = None
        self.opening = tuple(opening)
        if not opening:
            return
        tokens = torch.tensor(list(opening), dtype=torch.long)

        def find(module, args, kwargs):  # the layer stack's forward: mark the opening's tokens for the MLP
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or ids.dim() != 2:
                self.module.quiet = None
                return None
            mask = kwargs.get("attention_mask")
            real = mask[:, -ids.shape[1]:] if mask is not None and mask.dim() == 2 else None
            self.module.quiet = opening_mask(ids, _positions(ids, kwargs), tokens.to(ids.device), real)
            return None

        self._hook = self._stack.register_forward_pre_hook(find, with_kwargs=True)

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
        self.quiet_on(())
        return self.original


def attach_neuron(model: nn.Module, layer: int, variant: str | None = None, quiet_opening: bool = False) -> DynamicNeuron:
    """Attach a dynamic neuron to the MLP of decoder layer `layer` (0-based); `quiet_opening`: it may be
    kept off on a chat opening (`DynamicNeuron.quiet_on`)."""
    return DynamicNeuron(model, layer, variant, quiet_opening)
