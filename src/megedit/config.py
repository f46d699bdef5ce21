"""MeGConfig: every setting of the four stages in one typed object, to and from JSON / YAML."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .data.prompts import PRESETS
from .errors import ConfigError
from .io import parse_text
from .settings import check_settings, setting
from .stages.encoder import EncoderConfig
from .stages.fit_config import FitConfig
from .stages.generator import GeneratorConfig
from .stages.router import RouterConfig
from .stages.routing import RoutingConfig


def layered(base: dict, top: dict) -> dict:
    """Settings `base` with the layer `top` written over it, section by section (a config file over
    the defaults, flags over a file); a generator budget in steps given alone replaces the budget in
    passes below it (GeneratorConfig.step_budget)."""
    if isinstance(top.get("generator"), dict):
        top = {**top, "generator": GeneratorConfig.step_budget(top["generator"])}
    return _merged(base, top)


def _merged(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class MeGConfig:
    """Settings of MeG. `seed` is the one seed of a run: it is copied into every stage's config
    (fit initial vector, pool split, encoder order, router, generator) by `resolved()`."""

    layer: int | None = setting(None, at_least=0, help=(
        "the layer whose MLP gets the neuron; null: the architecture's default (80% of the depth; 24 on SmolLM2)"))
    prompt_format: str = setting("raw", choices=PRESETS, help="how queries are shown to the LM: raw, qa or chat")
    encoder: str = setting("minilm", help="base sentence encoder: minilm (embedded), a folder or a hub id")
    infer_subjects: bool = setting(True, help=(
        "an edit without a subject takes its prompt's longest run of capitalised words as one (data/subjects.py)"))
    fit: FitConfig = setting(default_factory=FitConfig, help="stage A: fitting one neuron vector per edit")
    routing: RoutingConfig = setting(default_factory=RoutingConfig, help="stages B and C: the encoder and the router")
    generator: GeneratorConfig = setting(default_factory=GeneratorConfig, help="stage D: the weight generator")
    seed: int = setting(0, help="the one seed of a run, copied into every stage's settings")

    def resolved(self) -> "MeGConfig":
        """A copy with the layer and the seed written into the stage configs, validated."""
        check_settings(self, "config")
        routing = RoutingConfig(replace(self.routing.encoder, seed=self.seed), replace(self.routing.router, seed=self.seed),
                                self.routing.calibration_size, self.seed).validate()
        return replace(self, fit=replace(self.fit, layer=self.layer, init_seed=self.seed), routing=routing,
                       generator=replace(self.generator, seed=self.seed).validate())

    def validate(self) -> "MeGConfig":
        self.resolved()
        return self

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
                kwargs[key] = _build(nested[key], value, f"{where}.{key}")
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


def _build(cls, d, where: str):
    _check_keys(d, {f.name for f in fields(cls)}, where)
    _check_types(cls, d, where)
    try:
        return cls(**d)
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
