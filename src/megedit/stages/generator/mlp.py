"""The reviewers' simpler generator: a residual MLP from the query embedding straight to the
(normalised) vector, trained with MSE; one forward pass per query, no sampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...settings import setting


@dataclass
class MLPConfig:
    hidden: int = setting(1024, at_least=1, help="width of the residual blocks")
    depth: int = setting(3, at_least=0, help="residual blocks")
    dropout: float = setting(0.1, at_least=0, below=1, help="dropout in each block")

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


class MLPKind:
    """The "mlp" generator kind: one forward pass per query, trained with MSE (kinds.py)."""

    trains = True

    def network(self, config, length: int, cond_dim: int) -> nn.Module:
        return MLPGenerator(length, cond_dim, config.mlp_config())

    def diffusion(self, config) -> None:
        return None

    def saved_settings(self, net: MLPGenerator) -> dict:
        return {}

    def saved_network(self, path, tensors: dict) -> None:
        return None  # built from the config; its weights are loaded into it

    def describe(self, net: MLPGenerator, config) -> str:
        return f"mlp ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters)"
