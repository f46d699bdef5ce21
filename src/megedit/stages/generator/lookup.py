"""The `lookup` generator: no network, the fitted vector of the nearest training condition.

It answers what a learned generator adds over plain retrieval: for a query it returns the vector
paired with the most cosine-similar training embedding (an edit's prompt or, with condition
augmentation, one of its other wordings). Its table is its state, saved like any weights: each
distinct vector once (an edit's wordings share one), and per key the row of its vector.
"""

from __future__ import annotations

import torch
from torch import nn


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
