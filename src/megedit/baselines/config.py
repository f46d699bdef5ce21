"""The baselines' settings: plain dataclasses, free of torch, so the CLI builds its flags from
them without loading a model library. Each is checked by `validate()` where it is used."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class FTConfig:
    layer: int | None = None  # None: arch.default_layer, where MeG's neuron goes
    lr: float = 3.0  # measured on 256 CounterFact edits: lr 1 reached Rel AG 29%, lr 3 49% in 5 epochs
    momentum: float = 0.5  # SGD's
    epochs: int = 8  # passes over the edits
    batch_size: int = 32  # edits per step
    max_grad_norm: float | None = 1.0  # clip: a few edits' gradients otherwise blow SGD up
    optimizer: str = "sgd"  # sgd or adam (adam ignores momentum)
    norm_constraint: float | None = None  # |w - w_original| <= this for every weight (L-infinity ball)
    stop_loss: float | None = None  # stop after the first epoch whose mean loss is below this
    seed: int = 0

    def validate(self) -> "FTConfig":
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or not 0 <= self.momentum < 1:
            raise ConfigError(f"FT needs lr > 0, epochs >= 1, batch_size >= 1 and momentum in [0, 1): {self}")
        if self.optimizer not in ("sgd", "adam") or (self.norm_constraint is not None and self.norm_constraint <= 0):
            raise ConfigError(f"FT needs optimizer sgd or adam and norm_constraint > 0 where set: {self}")
        return self


METHODS = ("memit", "alphaedit")


@dataclass
class MemitConfig:
    method: str = "memit"  # or "alphaedit"
    layers: tuple[int, ...] | None = None  # None: the default span (layers at 13-27% of the depth)
    mom2_weight: float = 15000.0  # MEMIT: lambda, the weight of the key covariance
    l2: float = 10.0  # AlphaEdit: a, the ridge term
    null_threshold: float = 1e-2  # AlphaEdit: eigenvalues of C below this span its null space
    v_steps: int = 25  # value search: at most this many Adam steps per edit
    v_lr: float = 0.5  # value search: Adam's learning rate
    v_weight_decay: float = 1e-3  # value search: weight decay on the residual offset
    v_tol: float = 0.05  # an edit's value search stops once its loss (NLL + KL) is below this
    clamp_norm: float = 4.0  # |delta| <= clamp_norm * |h|
    kl_factor: float = 0.0625  # weight of KL(edited || base) of the next token after "{subject} is a"
    context_prefixes: int = 20  # prompts behind model-written prefixes (keys averaged, values fitted on all)
    batch_size: int = 32  # value-search rows (an edit's prompt and its prefixed copies) per forward pass
    seed: int = 0  # the context prefixes' sampling

    def validate(self) -> "MemitConfig":
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.mom2_weight < 0 or self.l2 <= 0 or self.v_steps < 1 or self.v_lr <= 0 or self.batch_size < 1
                or self.kl_factor < 0 or self.context_prefixes < 0):
            raise ConfigError(f"{self.method} needs mom2_weight >= 0, l2 > 0, v_steps >= 1, v_lr > 0, batch_size >= 1, "
                              "kl_factor >= 0, context_prefixes >= 0")
        return self
