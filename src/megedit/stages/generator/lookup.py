"""The `lookup` generator: no network, the fitted vector of the nearest training condition.

It answers what a learned generator adds over plain retrieval: for a query it returns the vector
paired with the most cosine-similar training embedding (an edit's prompt or, with condition
augmentation, one of its other wordings). Its table is its state, saved like any weights: each
distinct vector once (an edit's wordings share one), and per key the row of its vector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import MeGError


class LookupTable(nn.Module):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """`keys` (P, cond_dim) with `values` (P, length) row by row, or, with `index` (P,), the
        distinct `values` (U, length) and the row of each key's vector."""
        super().__init__()
        values = values.float()
        if index is None and len(values):
            values, index = torch.unique(values, dim=0, return_inverse=True)
        self.register_buffer("keys", nn.functional.normalize(keys.float(), dim=-1))
        self.register_buffer("values", values)
        self.register_buffer("index", torch.arange(len(keys)) if index is None else index.long())

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        nearest = (nn.functional.normalize(cond.float(), dim=-1) @ self.keys.T).argmax(-1)
        return self.values[self.index[nearest]]


class LookupKind:
    """The "lookup" generator kind: nothing to train, the table is the training pairs (kinds.py)."""

    trains = False

    def network(self, config, length: int, cond_dim: int) -> nn.Module:
        return LookupTable(torch.zeros(0, cond_dim), torch.zeros(0, length))

    def diffusion(self, config) -> None:
        return None

    def from_pairs(self, cond: torch.Tensor, x: torch.Tensor) -> LookupTable:
        return LookupTable(cond, x)

    def saved_settings(self, net: LookupTable) -> dict:
        return {}

    def saved_network(self, path: Path, tensors: dict) -> LookupTable:
        """The table a lookup generator file holds (files written before 2026-11-26 have one
        vector per key and no index)."""
        keys, values, index = tensors.get("net.keys"), tensors.get("net.values"), tensors.get("net.index")
        if keys is None or values is None:
            raise MeGError(f"{path}: lookup generator file has no table")
        rows = len(values) if index is None else len(index)
        if keys.ndim != 2 or values.ndim != 2 or rows != len(keys) or (
                index is not None and len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(values)):
            raise MeGError(f"{path}: lookup generator table is inconsistent (keys {tuple(keys.shape)}, "
                           f"vectors {tuple(values.shape)}, index {None if index is None else tuple(index.shape)})")
        return LookupTable(keys, values, index if index is not None else torch.arange(len(values)))

    def describe(self, net: LookupTable, config) -> str:
        return f"lookup ({len(net.keys):,} keys, {len(net.values):,} distinct vectors)"
