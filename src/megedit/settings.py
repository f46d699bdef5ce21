"""Config fields that describe themselves.

Each setting of a config dataclass is declared with `setting(default, help, ...)`: its help text,
its valid range and its allowed values live in the field's metadata. One validator
(`check_settings`) checks every range and choice; a config's `validate()` calls it and adds the
rules that tie several fields together. The CLI builds its flags' help, choices and count checks
from the same metadata, and scripts/config_reference.py writes docs/reference/config.md from it.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Iterable, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Valid numbers: above or at least `low`, below or at most `high` (None: no bound)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is out
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(['[not self.low_open]}{self.low:g}, {self.high:g}{')]'[not self.high_open]}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "any"


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, at_least: float | None = None,
            above: float | None = None, at_most: float | None = None, below: float | None = None,
            choices: Iterable[str] | None = None) -> Any:
    """A dataclass field with its help text, valid range (at_least / above, at_most / below) and
    allowed values (`choices`: any iterable of names, e.g. a registry) in its metadata."""
    bounds = (at_least, above, at_most, below)
    meta: dict[str, Any] = {"help": help}
    if any(b is not None for b in bounds):
        meta["range"] = Range(above if above is not None else at_least, below if below is not None else at_most,
                              low_open=above is not None, high_open=below is not None)
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, default_factory=default_factory, metadata=meta)


def show_value(value: Any) -> str:
    """A value as a config file writes it."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, float) else str(value)


def help_of(f: Field) -> str:
    return f.metadata.get("help", "")


def range_of(f: Field) -> Range | None:
    return f.metadata.get("range")


def choices_of(f: Field) -> tuple[str, ...] | None:
    """The allowed values of a field, in their declared order; None where any value goes."""
    choices = f.metadata.get("choices")
    return None if choices is None else tuple(choices)


def field_problems(config: Any) -> list[str]:
    """Each field of the dataclass instance `config` whose value is outside its range or choices
    (None is left to the field's type: it means "the default rule" where a field allows it)."""
    problems, hints = [], typing.get_type_hints(type(config))
    for f in fields(config):
        value, valid, choices = getattr(config, f.name), range_of(f), choices_of(f)
        if value is None:
            continue
        or_null = " or null" if type(None) in typing.get_args(hints[f.name]) else ""
        if valid is not None and value not in valid:
            problems.append(f"{f.name} must be {valid}{or_null}, found {value!r}")
        if choices is not None and value not in choices:
            problems.append(f"{f.name} must be one of {', '.join(choices)}{or_null}, found {value!r}")
    return problems


def check_settings(config: Any, where: str, more: Sequence[str] = ()) -> Any:
    """`config` itself when every field is in range (`field_problems`) and `more`, the problems its
    cross-field rules found, is empty; else one ConfigError naming them all."""
    problems = [*field_problems(config), *more]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return config
