"""The diffusion process over (normalised) neuron vectors, kept apart from the network.

A 1000-step DDPM schedule with linear beta from 1e-4 to 0.02:
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. What the network outputs (`prediction`):
- "v": v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, loss MSE on v (the spec's);
- "x0": x0 itself, loss MSE on x0;
- "edm": F in x0 = c_skip(t) x_t + c_out(t) F (Karras et al. 2022), loss MSE on F, with
  c_skip = a d^2 / (a^2 d^2 + s^2), c_out = s d / sqrt(a^2 d^2 + s^2) for a = sqrt(abar_t),
  s = sqrt(1 - abar_t), d = `sigma_data`; d = 1 gives back v-prediction (F = -v), d -> 0 x0.
Two samplers over a respaced subset of the timesteps: deterministic DDIM (eta = 0) and ancestral
sampling with the respaced posterior variance. The network is any callable `net(x_t, t, cond)`.

Why "edm" with a small d here: a generator memorises one vector per query, so given the query
x_t tells little until its noise is below the vector's own uncertainty (d). A v network must
rebuild sqrt(abar_t) x_t exactly to cancel it, and on 1,024 CounterFact vectors it did that
badly at mid noise (bench/results/denoising-profile-1024.json); an x0 network has to learn to
copy x_t at low noise instead. With "edm" the copying is the formula's, where the noise is
below d, and the network predicts the rest. On the same data every model's first guess (from
pure noise) was its best and later steps added error, so 1-2 sampling steps beat 50 there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ...errors import ConfigError

SAMPLERS = ("ddim", "ancestral")
PREDICTIONS = ("v", "x0", "edm")
Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


class Diffusion:
    def __init__(self, schedule: Schedule = Schedule(), prediction: str = "v", sigma_data: float = 1.0) -> None:
        if prediction not in PREDICTIONS:
            raise ConfigError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if not sigma_data > 0:
            raise ConfigError(f"sigma_data must be > 0, got {sigma_data}")
        self.schedule, self.prediction, self.sigma_data = schedule, prediction, sigma_data
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

    def _skip_out(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's x0 = c_skip x_t + c_out F for data of scale sigma_data, in this schedule's terms."""
        a, s = self._coefficients(t, like)
        d = self.sigma_data
        norm = (a * a * d * d + s * s).sqrt()
        return a * d * d / norm ** 2, s * d / norm

    def x0_and_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output read as (x0, eps) under this diffusion's prediction type."""
        if self.prediction == "v":
            return self.x0_from_v(x_t, t, out), self.eps_from_v(x_t, t, out)
        if self.prediction == "x0":
            x0 = out
        else:
            skip, scale = self._skip_out(t, x_t)
            x0 = skip * x_t + scale * out
        a, s = self._coefficients(t, x_t)
        return x0, (x_t - a * x0) / s

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output."""
        if self.prediction == "v":
            return self.v_target(x0, t, noise)
        if self.prediction == "x0":
            return x0
        skip, scale = self._skip_out(t, x0)
        return (x0 - skip * self.add_noise(x0, t, noise)) / scale

    def training_loss(self, net: Net, x0: torch.Tensor, cond: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between the network's output and its target (v or x0) at uniformly drawn timesteps."""
        t = torch.randint(self.schedule.steps, (len(x0),), generator=generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        return torch.nn.functional.mse_loss(net(self.add_noise(x0, t, noise), t, cond), self.target(x0, t, noise))

    def timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spaced over the schedule, from the noisiest down to 0."""
        if not 1 <= steps <= self.schedule.steps:
            raise ConfigError(f"sampling steps must be in 1..{self.schedule.steps}, got {steps}")
        last = self.schedule.steps - 1
        if steps == 1:
            return [last]
        return sorted({round(last * i / (steps - 1)) for i in range(steps)}, reverse=True)

    @torch.no_grad()
    def sample(self, net: Net, cond: torch.Tensor, shape: tuple[int, ...], steps: int = 50, sampler: str = "ddim",
               generator: torch.Generator | None = None,
               on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """x0 for each row of `cond`, starting from seeded Gaussian noise of `shape` (B, ...);
        `on_step(t, x0)` sees the network's x0 at every step (for diagnostics)."""
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        x = torch.randn(shape, generator=generator, device="cpu").to(cond.device, cond.dtype)
        ts = self.timesteps(steps)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else None
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            x0, eps = self.x0_and_eps(x, tt, net(x, tt, cond))
            if on_step is not None:
                on_step(t, x0)
            if t_prev is None:
                x = x0
                continue
            abar, abar_prev = float(self.alpha_bar[t]), float(self.alpha_bar[t_prev])
            if sampler == "ddim":
                x = abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps
            else:  # the DDPM posterior q(x_prev | x_t, x0) of the respaced chain
                beta = 1 - abar / abar_prev
                mean = (abar_prev ** 0.5 * beta / (1 - abar)) * x0 + ((1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)) * x
                var = beta * (1 - abar_prev) / (1 - abar)
                noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
                x = mean + var ** 0.5 * noise
        return x
