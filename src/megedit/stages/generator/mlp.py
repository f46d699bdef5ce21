"""The reviewers' simpler generator: a residual MLP from the query embedding straight to the
(normalised) vector, trained with MSE; one forward pass per query, no sampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class MLPConfig:
    hidden: int = 1024
    depth: int = 3
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class MLPGenerator(nn.Module):
    def __init__(self, length: int, cond_dim: int, config: MLPConfig) -> None:
        super().__init__()
        self.length, self.config = length, config
        self.inp = nn.Linear(cond_dim, config.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(config.hidden), nn.Linear(config.hidden, config.hidden), nn.GELU(),
                          nn.Dropout(config.dropout))
            for _ in range(config.depth)
        )
        self.out = nn.Linear(config.hidden, length)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = self.inp(cond)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
