"""The generator as one object: network (DiT + diffusion, or MLP), the vector normalisation, and
how to sample; saved as safetensors + JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError, MeGError
from ...io import atomic_save_tensors, atomic_write_json, load_tensors, read_record
from .diffusion import PREDICTIONS, SAMPLERS, Diffusion, Schedule
from .dit import DIT_PRESETS, DiT, DiTConfig
from .lookup import LookupTable
from .mlp import MLPConfig, MLPGenerator

GENERATOR_KINDS = ("dit", "mlp", "lookup")
NORMALIZATIONS = ("standard", "scale")


@dataclass
class GeneratorConfig:
    kind: str = "dit"  # or "mlp", the reviewers' simpler alternative, or "lookup" (nearest condition, no network)
    preset: str = "cpu"  # DiT size: see DIT_PRESETS
    dit: dict = field(default_factory=dict)  # overrides of the preset's fields
    mlp: dict = field(default_factory=dict)  # overrides of MLPConfig
    normalization: str = "standard"  # per-coordinate mean/std of the fitted vectors, or "scale" (x scale)
    scale: float = 100.0  # the authors' factor, for normalization "scale"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    train_steps: int = 4000  # the budget, unless `passes` is set
    passes: float | None = None  # the budget in passes over the edits (each edit's vector drawn this often, through
    # any of its wordings): steps grow linearly with the edits, not with the wordings per edit
    augment: bool = True  # also train on every other fitted wording of an edit -> the edit's vector
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    validate_every: int = 500
    validation_size: int = 64  # edits sampled at each validation (the first ones, fixed)
    prediction: str = "edm"  # what the DiT predicts: "edm" (default), "v" (the spec's) or "x0"; see diffusion.py
    sigma_data: float = 0.2  # for "edm": the scale of x0 given the query (1.0 makes "edm" the same as "v")
    sample_steps: int = 50  # the spec's; 1-2 were more accurate on memorised vectors (README, stage D)
    sampler: str = "ddim"
    zero_augment: float = 0.0  # unrelated queries paired with the zero vector, as a share of the edits
    seed: int = 0

    def validate(self) -> "GeneratorConfig":
        problems = []
        if self.kind not in GENERATOR_KINDS:
            problems.append(f"kind must be one of {', '.join(GENERATOR_KINDS)}")
        if self.preset not in DIT_PRESETS:
            problems.append(f"preset must be one of {', '.join(DIT_PRESETS)}")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization must be one of {', '.join(NORMALIZATIONS)}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}")
        if self.prediction not in PREDICTIONS:
            problems.append(f"prediction must be one of {', '.join(PREDICTIONS)}")
        if min(self.batch_size, self.train_steps, self.validate_every, self.validation_size, self.sample_steps) < 1:
            problems.append("batch_size, train_steps, validate_every, validation_size, sample_steps must be >= 1")
        if self.passes is not None and not self.passes > 0:
            problems.append("passes must be > 0 (or null: train_steps is the budget)")
        if not 0 <= self.ema_decay < 1 or self.zero_augment < 0 or not self.sigma_data > 0:
            problems.append("need 0 <= ema_decay < 1, zero_augment >= 0 and sigma_data > 0")
        unknown = set(self.dit) - set(asdict(DiTConfig())) | set(self.mlp) - set(asdict(MLPConfig()))
        if unknown:
            problems.append(f"unknown network fields {sorted(unknown)}")
        if problems:
            raise ConfigError("generator config: " + "; ".join(problems))
        return self

    def steps_for(self, n_edits: int) -> int:
        """Training steps for pairs from `n_edits` edits: `passes` over the edits, else `train_steps`."""
        if self.passes is None:
            return self.train_steps
        return max(1, math.ceil(self.passes * n_edits / self.batch_size))

    def dit_config(self) -> DiTConfig:
        return replace(DIT_PRESETS[self.preset], **self.dit)

    def mlp_config(self) -> MLPConfig:
        return MLPConfig(**self.mlp)


class Generator:
    """Query embeddings (B, cond_dim) -> neuron vectors (B, length), in the LM's units."""

    def __init__(self, config: GeneratorConfig, length: int, cond_dim: int, mean: torch.Tensor, std: torch.Tensor,
                 net: nn.Module | None = None) -> None:
        self.config = config.validate()
        self.length, self.cond_dim = length, cond_dim
        self.mean, self.std = mean.float(), std.float()
        if net is None:
            net = (DiT(length, cond_dim, config.dit_config()) if config.kind == "dit"
                   else MLPGenerator(length, cond_dim, config.mlp_config()) if config.kind == "mlp"
                   else LookupTable(torch.zeros(0, cond_dim), torch.zeros(0, length)))
        self.net = net
        self.diffusion = Diffusion(Schedule(), config.prediction, config.sigma_data) if config.kind == "dit" else None
        self.record: dict = {}

    @classmethod
    def for_vectors(cls, config: GeneratorConfig, vectors: torch.Tensor, cond_dim: int) -> "Generator":
        """A fresh generator whose normalisation comes from these fitted vectors (N, length)."""
        vectors = vectors.detach().float().cpu()
        if config.normalization == "standard":
            mean, std = vectors.mean(0), vectors.std(0).clamp(min=1e-6) if len(vectors) > 1 else torch.ones(vectors.shape[1])
        else:
            mean, std = torch.zeros(vectors.shape[1]), torch.full((vectors.shape[1],), 1.0 / config.scale)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return cls(config, vectors.shape[1], cond_dim, mean, std)

    def normalize(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.mean.to(vectors.device)) / self.std.to(vectors.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)

    def loss(self, net: nn.Module, x: torch.Tensor, cond: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        """Training loss on normalised vectors `x` with `net` (the generator's network, possibly wrapped)."""
        if self.diffusion is None:
            return nn.functional.mse_loss(net(cond), x)
        return self.diffusion.training_loss(net, x, cond, noise)

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, steps: int | None = None, sampler: str | None = None, seed: int = 0,
                 net: nn.Module | None = None) -> torch.Tensor:
        """Vectors for each query embedding; seeded, so the same call gives the same vectors."""
        net = net or self.net
        was_training = net.training
        net.eval()
        device = next(iter([*net.parameters(), *net.buffers()])).device  # a lookup table has buffers only
        cond = cond.to(device, torch.float32)
        if self.diffusion is None:
            x = net(cond)
        else:
            x = self.diffusion.sample(net, cond, (len(cond), self.length), steps or self.config.sample_steps,
                                      sampler or self.config.sampler, torch.Generator().manual_seed(seed))
        net.train(was_training)
        return self.denormalize(x)

    def to(self, device) -> "Generator":
        """Move the network (the normalisation follows the vectors it is applied to)."""
        self.net.to(device)
        return self

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        atomic_save_tensors(path, {**tensors, "norm.mean": self.mean, "norm.std": self.std})
        config = asdict(self.config)
        if self.config.kind == "dit":  # every network field, so a later change of the presets cannot alter it
            config["dit"] = asdict(self.net.config)
        atomic_write_json(path.with_suffix(".json"), {"config": config, "length": self.length,
                                                      "cond_dim": self.cond_dim, "record": self.record})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Generator":
        path = Path(path)
        meta, config, length, cond_dim = read_record(path, "generator", lambda m: (
            m, GeneratorConfig(**_upgrade(m["config"])).validate(), int(m["length"]), int(m["cond_dim"])))
        tensors = load_tensors(path, "generator")
        if "norm.mean" not in tensors or "norm.std" not in tensors:
            raise MeGError(f"{path}: generator file has no normalisation tensors")
        generator = cls(config, length, cond_dim, tensors["norm.mean"], tensors["norm.std"],
                        net=_lookup_table(path, tensors) if config.kind == "lookup" else None)
        if config.kind != "lookup":
            try:
                generator.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            except RuntimeError as error:
                raise MeGError(f"{path}: generator weights do not match its record ({str(error).splitlines()[0]})") from None
        generator.net.eval().requires_grad_(False)
        generator.record = meta.get("record", {})
        return generator


def _lookup_table(path: Path, tensors: dict) -> LookupTable:
    """The table a lookup generator file holds (files written before 2026-11-26 have one vector
    per key and no index)."""
    keys, values, index = tensors.get("net.keys"), tensors.get("net.values"), tensors.get("net.index")
    if keys is None or values is None:
        raise MeGError(f"{path}: lookup generator file has no table")
    rows = len(values) if index is None else len(index)
    if keys.ndim != 2 or values.ndim != 2 or rows != len(keys) or (
            index is not None and len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(values)):
        raise MeGError(f"{path}: lookup generator table is inconsistent (keys {tuple(keys.shape)}, "
                       f"vectors {tuple(values.shape)}, index {None if index is None else tuple(index.shape)})")
    return LookupTable(keys, values, index if index is not None else torch.arange(len(values)))


def _upgrade(config: dict) -> dict:
    """A config saved before the prediction type was recorded: v-prediction, and the DiT fields
    every preset had then."""
    if "prediction" in config:
        return config
    return {**config, "prediction": "v", "dit": {"cond_dropout": 0.2, "cond_token": False, **config.get("dit", {})}}
