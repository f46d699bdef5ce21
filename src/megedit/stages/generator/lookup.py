"""The `lookup` generator: no network, the fitted vector of the nearest training condition.

It answers what a learned generator adds over plain retrieval: for a query it returns the vector
paired with the most cosine-similar training embedding (an edit's prompt or, with condition
augmentation, one of its other wordings). Its table is its state, saved like any weights.
"""

from __future__ import annotations

import torch
from torch import nn


class LookupTable(nn.Module):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keys", nn.functional.normalize(keys.float(), dim=-1))
        self.register_buffer("values", values.float())

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        nearest = (nn.functional.normalize(cond.float(), dim=-1) @ self.keys.T).argmax(-1)
        return self.values[nearest]
