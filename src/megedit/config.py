"""MeGConfig: every setting of the four stages in one typed object, to and from JSON / YAML."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .data.prompts import get_format
from .errors import ConfigError
from .io import parse_text
from .stages.encoder import EncoderConfig
from .stages.fit_neurons import FitConfig
from .stages.generator import GeneratorConfig
from .stages.router import RouterConfig
from .stages.routing import RoutingConfig


def _default_generator() -> GeneratorConfig:
    # The lookup (each query takes the fitted vector of its nearest training wording), not a network:
    # measured against the MLP on the same stages A-C it scored at least as high everywhere, the more
    # so as N grows (Score 95.1 vs 94.3 at 1,024 CounterFact edits, 92.0 vs 85.2 at 4,096, 88.2 vs
    # 64.2 at 10,000; 91.4 vs 90.3 on the swapped files, 99.2 vs 96.4 on ZsRE; docs/results.md).
    # The MLP and the DiT stay one setting away; `passes` (500 over the edits, growing linearly with
    # them) is their training budget, unused by the lookup.
    return GeneratorConfig(kind="lookup", passes=500.0)


def with_step_budget(generator):
    """Generator settings as given, where a budget in steps given alone (train_steps, no passes)
    replaces the budget in passes that the defaults or a config file hold."""
    if isinstance(generator, dict) and "train_steps" in generator and "passes" not in generator:
        return {**generator, "passes": None}
    return generator


@dataclass
class MeGConfig:
    """Settings of MeG. `seed` is the one seed of a run: it is copied into every stage's config
    (fit initial vector, pool split, encoder order, router, generator) by `resolved()`."""

    layer: int | None = None  # None: the architecture's default (80% of the depth; 24 on SmolLM2)
    prompt_format: str = "raw"  # how queries are shown to the LM: raw | qa | chat
    encoder: str = "minilm"  # base sentence encoder: 'minilm' (embedded), a folder or a hub id
    fit: FitConfig = field(default_factory=FitConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    generator: GeneratorConfig = field(default_factory=_default_generator)
    seed: int = 0

    def resolved(self) -> "MeGConfig":
        """A copy with the layer and the seed written into the stage configs, validated."""
        get_format(self.prompt_format)
        routing = RoutingConfig(replace(self.routing.encoder, seed=self.seed),
                                replace(self.routing.router, seed=self.seed).validate(),
                                self.routing.calibration_size, self.seed)
        routing.encoder.validate()
        return replace(self, fit=replace(self.fit, layer=self.layer, init_seed=self.seed), routing=routing,
                       generator=replace(self.generator, seed=self.seed).validate())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "MeGConfig":
        """From a (possibly partial) dict; unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, found {type(d).__name__}")
        nested = {"fit": FitConfig, "generator": GeneratorConfig}
        _check_keys(d, {f.name for f in fields(cls)}, where)
        _check_types(cls, {k: v for k, v in d.items() if k not in (*nested, "routing")}, where)
        kwargs = {}
        for key, value in d.items():
            if key in nested:
                base = asdict(_default_generator()) if key == "generator" else {}
                value = with_step_budget(value) if key == "generator" else value
                kwargs[key] = _build(nested[key], value, f"{where}.{key}", base=base)
            elif key == "routing":
                _check_keys(value, {f.name for f in fields(RoutingConfig)}, f"{where}.routing")
                _check_types(RoutingConfig, {k: v for k, v in value.items() if k not in ("encoder", "router")},
                             f"{where}.routing")
                kwargs[key] = RoutingConfig(
                    _build(EncoderConfig, value.get("encoder", {}), f"{where}.routing.encoder"),
                    _build(RouterConfig, value.get("router", {}), f"{where}.routing.router"),
                    **{k: v for k, v in value.items() if k not in ("encoder", "router")})
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "MeGConfig":
        """A JSON or YAML file of settings (any subset of `to_dict()`)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = parse_text(text, yaml.safe_load if path.suffix in (".yaml", ".yml") else json.loads)
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: not a readable config file ({str(error).splitlines()[0]})") from None
        return cls.from_dict(data or {}, where=str(path))


def _check_keys(d, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(allowed))}")


def _build(cls, d, where: str, base: dict | None = None):
    _check_keys(d, {f.name for f in fields(cls)}, where)
    _check_types(cls, d, where)
    try:
        return cls(**{**(base or {}), **d})
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


_PLAIN = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def _check_types(cls, d: dict, where: str) -> None:
    """Each given value has its field's declared type (int, float, str, bool, dict, or None where
    the field allows it); a float where an int is declared, or a string for a number, is an error
    naming the setting."""
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        allowed = typing.get_args(hints[key]) if isinstance(hints[key], types.UnionType) else (hints[key],)
        plain = [t for t in allowed if t in _PLAIN]
        if not plain or (value is None and type(None) in allowed):
            continue
        ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in plain)
        ok = ok or (float in plain and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            expected = " or ".join(_PLAIN[t] for t in plain) + (" or null" if type(None) in allowed else "")
            raise ConfigError(f"{where}.{key}: expected {expected}, found {type(value).__name__} {value!r}")
