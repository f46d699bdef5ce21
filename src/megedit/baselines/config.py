"""The baselines' settings: plain dataclasses, free of torch, so the CLI builds its flags from
them without loading a model library. Each is checked by `validate()` where it is used."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import check_settings, setting

OPTIMIZERS = ("sgd", "adam")


@dataclass
class FTConfig:
    layer: int | None = setting(None, at_least=0, help="null: arch.default_layer, where MeG's neuron goes")
    lr: float = setting(3.0, above=0, help=(
        "measured on 256 CounterFact edits: lr 1 reached Rel AG 29%, lr 3 49% in 5 epochs"))
    momentum: float = setting(0.5, at_least=0, below=1, help="SGD's")
    epochs: int = setting(8, at_least=1, help="passes over the edits")
    batch_size: int = setting(32, at_least=1, help="edits per step")
    max_grad_norm: float | None = setting(1.0, help="clip: a few edits' gradients otherwise blow SGD up")
    optimizer: str = setting("sgd", choices=OPTIMIZERS, help="sgd or adam (adam ignores momentum)")
    norm_constraint: float | None = setting(None, above=0, help=(
        "|w - w_original| <= this for every weight (L-infinity ball)"))
    stop_loss: float | None = setting(None, help="stop after the first epoch whose mean loss is below this")
    seed: int = setting(0, help="the edits' order")

    def validate(self) -> "FTConfig":
        return check_settings(self, "ft config")


# the batch weight editors that share MemitConfig (the method registry, megedit/methods.py, runs them)
METHODS = ("memit", "alphaedit")


@dataclass
class MemitConfig:
    method: str = setting("memit", choices=METHODS, help="memit or alphaedit")
    layers: tuple[int, ...] | None = setting(None, help="null: the default span (layers at 13-27% of the depth)")
    mom2_weight: float = setting(15000.0, at_least=0, help="MEMIT: lambda, the weight of the key covariance")
    l2: float = setting(10.0, above=0, help="AlphaEdit: a, the ridge term")
    null_threshold: float = setting(1e-2, help="AlphaEdit: eigenvalues of C below this span its null space")
    v_steps: int = setting(25, at_least=1, help="value search: at most this many Adam steps per edit")
    v_lr: float = setting(0.5, above=0, help="value search: Adam's learning rate")
    v_weight_decay: float = setting(1e-3, help="value search: weight decay on the residual offset")
    v_tol: float = setting(0.05, help="an edit's value search stops once its loss (NLL + KL) is below this")
    clamp_norm: float = setting(4.0, help="|delta| <= clamp_norm * |h|")
    kl_factor: float = setting(0.0625, at_least=0, help=(
        'weight of KL(edited || base) of the next token after "{subject} is a"'))
    context_prefixes: int = setting(20, at_least=0, help=(
        "prompts behind model-written prefixes (keys averaged, values fitted on all)"))
    batch_size: int = setting(32, at_least=1, help=(
        "value-search rows (an edit's prompt and its prefixed copies) per forward pass"))
    seed: int = setting(0, help="the context prefixes' sampling")

    def validate(self) -> "MemitConfig":
        return check_settings(self, "memit config")
