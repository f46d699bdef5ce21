"""A Diffusion Transformer over 1-D weight vectors (adaLN-Zero, as in Peebles & Xie's DiT).

The vector is zero-padded to a multiple of the patch size and cut into patches (the tokens);
each block is conditioned on c = timestep embedding + projection of the query embedding through
adaptive layer-norm shifts, scales and gates that start at zero (so every block starts as the
identity). Dropout on c during training regularises the conditioning (the spec's 0.2).

The query embedding is unit-norm, so each of its coordinates is about 1/sqrt(d): projected as it
is, it is tiny next to the timestep features and the network ignores it for a long time. It is
multiplied by sqrt(d) first (`unit_condition`): on 1,024 CounterFact vectors the DiT then reaches
in 2,000 steps what it reached in 4,000 without (bench/results/generator-1024*.json).

The `cpu` preset departs from the spec in two ways that help a small network memorise one
vector per query in a CPU half hour: no dropout on c (dropout blurs exactly the identity of the
query it has to recall) and the projected query also added to every token (`cond_token`), so the
tokens carry it directly, not only through the adaLN modulation. The other presets keep the spec's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...errors import ConfigError
from ...settings import setting
from .diffusion import Diffusion, Schedule


@dataclass
class DiTConfig:
    patch: int = setting(96, at_least=1, help="coordinates of the vector per token")
    hidden: int = setting(192, at_least=1, help="token width (a multiple of heads)")
    depth: int = setting(4, at_least=1, help="transformer blocks")
    heads: int = setting(4, at_least=1, help="attention heads")
    mlp_ratio: float = setting(4.0, above=0, help="a block's MLP width, in multiples of hidden")
    cond_dropout: float = setting(0.2, at_least=0, below=1, help=(
        "dropout on the condition while training (the spec's 0.2; the cpu preset's 0)"))
    unit_condition: bool = setting(True, help="scale the unit-norm query embedding to unit variance per coordinate")
    cond_token: bool = setting(False, help=(
        "also add the projected query embedding to every token (not only through adaLN)"))

    def to_dict(self) -> dict:
        return asdict(self)


# "cpu": trains 1,024 vectors in minutes on 2 cores; "dit-b": the authors' size, for GPUs.
DIT_PRESETS = {
    "cpu": DiTConfig(cond_dropout=0.0, cond_token=True),
    "dit-s": DiTConfig(patch=100, hidden=384, depth=12, heads=6),
    "dit-b": DiTConfig(patch=100, hidden=768, depth=12, heads=12),
}


def sincos(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) positions or timesteps -> (N, dim) sin-cos features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None]
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1) if dim % 2 else out


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight), nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """v-prediction network: (x_t (B, length), t (B,), cond (B, cond_dim)) -> (B, length)."""

    def __init__(self, length: int, cond_dim: int, config: DiTConfig) -> None:
        super().__init__()
        if config.hidden % config.heads:
            raise ConfigError(f"DiT: hidden {config.hidden} is not a multiple of heads {config.heads}")
        self.length, self.config = length, config
        self.tokens = -(-length // config.patch)
        self.embed = nn.Linear(config.patch, config.hidden)
        self.register_buffer("positions", sincos(torch.arange(self.tokens), config.hidden), persistent=False)
        self.time = nn.Sequential(nn.Linear(256, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.hidden))
        self.cond = nn.Linear(cond_dim, config.hidden)
        self.cond_token = nn.Linear(cond_dim, config.hidden) if config.cond_token else None
        self.cond_dropout = nn.Dropout(config.cond_dropout)
        self.blocks = nn.ModuleList(DiTBlock(config.hidden, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.hidden, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden, 2 * config.hidden))
        self.out = nn.Linear(config.hidden, config.patch)
        for layer in (self.final_ada[1], self.out):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batch = len(x)
        padded = nn.functional.pad(x, (0, self.tokens * self.config.patch - self.length))
        h = self.embed(padded.view(batch, self.tokens, self.config.patch)) + self.positions
        if self.config.unit_condition:
            cond = cond * math.sqrt(cond.shape[-1])
        if self.cond_token is not None:
            h = h + self.cond_token(cond)[:, None]
        c = self.cond_dropout(self.time(sincos(t, 256)) + self.cond(cond))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.out(_modulate(self.final_norm(h), shift, scale))
        return out.reshape(batch, -1)[:, : self.length]


class DiTKind:
    """The "dit" generator kind: this network, sampled by diffusion (the registry's entry, kinds.py)."""

    trains = True

    def network(self, config, length: int, cond_dim: int) -> nn.Module:
        return DiT(length, cond_dim, config.dit_config())

    def diffusion(self, config) -> Diffusion:
        return Diffusion(Schedule(), config.prediction, config.sigma_data)

    def saved_settings(self, net: DiT) -> dict:
        """Every network field, so a later change of the presets cannot alter a saved generator."""
        return {"dit": asdict(net.config)}

    def saved_network(self, path, tensors: dict) -> None:
        return None  # built from the config; its weights are loaded into it

    def describe(self, net: DiT, config) -> str:
        parameters = sum(p.numel() for p in net.parameters())
        return f"dit ({parameters / 1e6:.2f}M parameters, {config.sample_steps} {config.sampler} steps)"
