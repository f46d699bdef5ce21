"""The generator as one object: network (DiT + diffusion, or MLP), the vector normalisation, and
how to sample; saved as safetensors + JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ...errors import MeGError
from ...io import atomic_save_tensors, atomic_write_json, load_tensors, read_record
from ...settings import check_settings, field_problems, setting
from .diffusion import PREDICTIONS, SAMPLERS
from .dit import DIT_PRESETS, DiTConfig
from .kinds import GENERATOR_KINDS, generator_kind
from .mlp import MLPConfig

NORMALIZATIONS = ("standard", "scale")


class _Default:
    """A step budget's default, told apart from the same value given (GeneratorConfig.__post_init__)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass
class GeneratorConfig:
    # The lookup (each query takes the fitted vector of its nearest training wording), not a network:
    # measured against the MLP on the same stages A-C it scored at least as high everywhere, the more
    # so as N grows (Score 95.1 vs 94.3 at 1,024 CounterFact edits, 92.0 vs 85.2 at 4,096, 88.2 vs
    # 64.2 at 10,000; 91.4 vs 90.3 on the swapped files, 99.2 vs 96.4 on ZsRE; docs/results.md).
    kind: str = setting("lookup", choices=GENERATOR_KINDS, help=(
        "lookup: the fitted vector of the nearest training wording, no network; mlp: the reviewers' simpler "
        "network; dit: the paper's diffusion transformer"))
    preset: str = setting("cpu", choices=DIT_PRESETS, help="DiT size (dit)")
    dit: dict = setting(default_factory=dict, help="overrides of the DiT preset's fields (dit)")
    mlp: dict = setting(default_factory=dict, help="overrides of MLPConfig's fields (mlp)")
    normalization: str = setting("standard", choices=NORMALIZATIONS, help=(
        "standard: per-coordinate mean/std of the fitted vectors; scale: x scale"))
    scale: float = setting(100.0, above=0, help="the authors' factor, for normalization scale")
    lr: float = setting(1e-3, above=0, help="AdamW's learning rate")
    weight_decay: float = setting(0.0, at_least=0, help="AdamW's weight decay")
    batch_size: int = setting(128, at_least=1, help="training pairs per step")
    train_steps: int = setting(_Default(4000), at_least=1, help=(
        "the training budget in steps, where passes is null (given without passes, it clears them)"))
    # MLP and DiT only (the lookup trains nothing): 500 passes over the edits, growing linearly with them
    passes: float | None = setting(_Default(500.0), above=0, help=(
        "the training budget in passes over the edits (each edit's vector drawn this often, through any of its "
        "wordings): steps grow linearly with the edits, not with the wordings per edit; null: train_steps"))
    augment: bool = setting(True, help="also train on every other fitted wording of an edit -> the edit's vector")
    ema_decay: float = setting(0.999, at_least=0, below=1, help="decay of the weights' moving average")
    grad_clip: float = setting(1.0, above=0, help="gradient norm clip")
    validate_every: int = setting(500, at_least=1, help="steps between validations")
    validation_size: int = setting(64, at_least=1, help="edits sampled at each validation (the first ones, fixed)")
    prediction: str = setting("edm", choices=PREDICTIONS, help=(
        "what the DiT predicts: edm, v (the spec's) or x0 (diffusion.py)"))
    sigma_data: float = setting(0.2, above=0, help=(
        "for prediction edm: the scale of x0 given the query (1.0 makes edm the same as v)"))
    sample_steps: int = setting(50, at_least=1, help=(
        "DiT sampling steps (the spec's 50; 1-2 were more accurate on memorised vectors)"))
    sampler: str = setting("ddim", choices=SAMPLERS, help="DiT sampler")
    zero_augment: float = setting(0.0, at_least=0, help=(
        "unrelated queries paired with the zero vector, as a share of the edits"))
    seed: int = setting(0, help="seeds the network's initial weights and the batch order")

    def __post_init__(self) -> None:
        # the one place of the rule "train_steps given alone clears passes", for every way a config is
        # made (arguments, a dict, a file, flags); a saved config holds both, and passes wins as before
        steps_given = not isinstance(self.train_steps, _Default)
        if not steps_given:
            self.train_steps = self.train_steps.value
        if isinstance(self.passes, _Default):
            self.passes = None if steps_given else self.passes.value

    def validate(self) -> "GeneratorConfig":
        unknown = set(self.dit) - set(asdict(DiTConfig())) | set(self.mlp) - set(asdict(MLPConfig()))
        if unknown:
            return check_settings(self, "generator config", [f"unknown network fields {sorted(unknown)}"])
        networks = [f"dit.{p}" for p in field_problems(self.dit_config())] + [
            f"mlp.{p}" for p in field_problems(self.mlp_config())]
        return check_settings(self, "generator config", networks)

    @staticmethod
    def step_budget(given: dict) -> dict:
        """Generator settings as given, where a budget in steps given alone (train_steps, no passes)
        replaces the budget in passes that an earlier layer of settings holds (`megedit.config.layered`:
        a layer is written over a whole config, whose passes __post_init__ cannot tell from given ones)."""
        if isinstance(given, dict) and "train_steps" in given and "passes" not in given:
            return {**given, "passes": None}
        return given

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
        self.kind = generator_kind(config.kind)
        self.length, self.cond_dim = length, cond_dim
        self.mean, self.std = mean.float(), std.float()
        self.net = net if net is not None else self.kind.network(config, length, cond_dim)
        self.diffusion = self.kind.diffusion(config)
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
        config = {**asdict(self.config), **self.kind.saved_settings(self.net)}
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
        net = generator_kind(config.kind).saved_network(path, tensors)
        generator = cls(config, length, cond_dim, tensors["norm.mean"], tensors["norm.std"], net=net)
        if net is None:
            try:
                generator.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            except RuntimeError as error:
                raise MeGError(f"{path}: generator weights do not match its record ({str(error).splitlines()[0]})") from None
        generator.net.eval().requires_grad_(False)
        generator.record = meta.get("record", {})
        return generator


# what a saved config without these fields meant: they were added later, and until the lookup became
# the one default a GeneratorConfig was a DiT trained for train_steps
_BEFORE_THE_FIELD = {"kind": "dit", "passes": None}


def _upgrade(config: dict) -> dict:
    """A saved config as it was trained: fields added since take the value they had then, and a
    config saved before the prediction type was recorded gets v-prediction and the DiT fields
    every preset had then."""
    config = {**_BEFORE_THE_FIELD, **config}
    if "prediction" in config:
        return config
    return {**config, "prediction": "v", "dit": {"cond_dropout": 0.2, "cond_token": False, **config.get("dit", {})}}
