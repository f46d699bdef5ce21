"""The diffusion process over (normalised) neuron vectors, kept apart from the network.

A 1000-step DDPM schedule with linear beta from 1e-4 to 0.02 and v-prediction:
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and the network predicts
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (loss: MSE on v). Two samplers over a respaced
subset of the timesteps: deterministic DDIM (eta = 0) and ancestral sampling with the respaced
posterior variance. The network is any callable `net(x_t, t, cond) -> v`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ...errors import ConfigError

SAMPLERS = ("ddim", "ancestral")
VNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


class Diffusion:
    def __init__(self, schedule: Schedule = Schedule()) -> None:
        self.schedule = schedule
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, schedule.steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0)  # float64: exact round trips

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped to broadcast over `like` (B, ...)."""
        abar = self.alpha_bar.to(like.device)[t.long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().to(like.dtype).view(shape), (1 - abar).sqrt().to(like.dtype).view(shape)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x_t)
        return a * x_t - s * v

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x_t)
        return s * x_t + a * v

    def training_loss(self, net: VNet, x0: torch.Tensor, cond: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between the network's v and the true v at uniformly drawn timesteps."""
        t = torch.randint(self.schedule.steps, (len(x0),), generator=generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        return torch.nn.functional.mse_loss(net(self.add_noise(x0, t, noise), t, cond), self.v_target(x0, t, noise))

    def timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spaced over the schedule, from the noisiest down to 0."""
        if not 1 <= steps <= self.schedule.steps:
            raise ConfigError(f"sampling steps must be in 1..{self.schedule.steps}, got {steps}")
        last = self.schedule.steps - 1
        if steps == 1:
            return [last]
        return sorted({round(last * i / (steps - 1)) for i in range(steps)}, reverse=True)

    @torch.no_grad()
    def sample(self, net: VNet, cond: torch.Tensor, shape: tuple[int, ...], steps: int = 50, sampler: str = "ddim",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 for each row of `cond`, starting from seeded Gaussian noise of `shape` (B, ...)."""
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        x = torch.randn(shape, generator=generator, device="cpu").to(cond.device, cond.dtype)
        ts = self.timesteps(steps)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else None
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            v = net(x, tt, cond)
            x0 = self.x0_from_v(x, tt, v)
            if t_prev is None:
                x = x0
                continue
            abar, abar_prev = float(self.alpha_bar[t]), float(self.alpha_bar[t_prev])
            if sampler == "ddim":
                eps = self.eps_from_v(x, tt, v)
                x = abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps
            else:  # the DDPM posterior q(x_prev | x_t, x0) of the respaced chain
                beta = 1 - abar / abar_prev
                mean = (abar_prev ** 0.5 * beta / (1 - abar)) * x0 + ((1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)) * x
                var = beta * (1 - abar_prev) / (1 - abar)
                noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
                x = mean + var ** 0.5 * noise
        return x
